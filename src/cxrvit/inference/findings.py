"""Per-finding explanations: which labels get a Grad-CAM map, and where each map peaks.

Shared by ``cxrvit predict --report`` and ``cxrvit serve``. Grad-CAM costs a backward pass per
label, so it is computed only for the labels a reader looks at: every call, every near miss, and
the few most probable labels (so that a "no finding" image still has maps to look at).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from cxrvit.inference import heatmaps
from cxrvit.inference.prelim_report import assess
from cxrvit.inference.scoring import model_input

#: Placement of an image that fills its square (no padding): top, left, bottom, right.
WHOLE = (0.0, 0.0, 1.0, 1.0)

#: How many of the most probable labels get a Grad-CAM map besides the calls and near misses.
TOP_LABELS = 3
#: At most this many maps per image: a weak model puts most labels near their thresholds, and each
#: map is a backward pass (about 0.2 s at 224 px on 2 cores). Calls come first, then near misses.
MAX_LABELS = 6


def labels_to_explain(probs: Mapping[str, float], thresholds: Mapping[str, float], top: int = TOP_LABELS,
                      limit: int = MAX_LABELS) -> list[str]:
    calls = assess(probs, thresholds)
    chosen = [c.label for c in calls if c.call]
    chosen += [c.label for c in calls if c.near and not c.call]
    chosen += [c.label for c in calls[:top] if c.label not in chosen]
    return chosen[:max(limit, top)]


def peak_location(heat: np.ndarray, placement: Sequence[float] = WHOLE) -> dict | None:
    """Side and zone of a map's maximum on a frontal film; None when the maximum lies in the padding.

    ``heat`` covers the padded square the model saw; ``placement`` is where the image lies in it (top, left,
    bottom, right as fractions of the side: :func:`cxrvit.data.images.square_placement`, kept by ``predict`` as
    ``LoadedImage.placement``). Zones and sides are of the *image*, not of the square: a landscape film padded
    above and below has its thirds where the film's are. ``x`` and ``y`` are the peak's position as fractions of
    the image's width and height.

    Radiographic convention: a PA/AP film is viewed as if facing the patient, so the image's left
    half is the patient's *right*. Zones are thirds of the image height (upper/middle/lower); the
    middle tenth of the width is called central (mediastinum, spine).
    """
    h, w = heat.shape
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    top, left, bottom, right = (float(v) for v in placement)
    y_sq, x_sq = (row + 0.5) / h, (col + 0.5) / w
    if not (top <= y_sq <= bottom and left <= x_sq <= right):
        return None  # the padding holds no anatomy to name
    y, x = (y_sq - top) / (bottom - top), (x_sq - left) / (right - left)
    side = "central" if abs(x - 0.5) < 0.05 else ("right" if x < 0.5 else "left")
    zone = "upper" if y < 1 / 3 else ("middle" if y < 2 / 3 else "lower")
    return {"side": side, "zone": zone, "x": round(float(x), 3), "y": round(float(y), 3)}


@dataclass
class Explanation:
    attention: np.ndarray  # [S, S] in [0, 1]
    rollout: np.ndarray
    gradcam: dict[str, np.ndarray]  # label -> [S, S]
    peaks: dict[str, dict | None]  # label -> peak_location of its Grad-CAM map (None: the peak is in the padding)


def explain_findings(bundle, squares: Sequence[np.ndarray], probs: np.ndarray,
                     labels: Sequence[Sequence[str]],
                     placements: Sequence[Sequence[float]] | None = None) -> list[Explanation]:
    """Maps for square uint8 images (``LoadedImage.square``; resized to the model size as the scoring pass
    does): attention and rollout once each, Grad-CAM for ``labels[i]``, peaks located within ``placements[i]``
    (the image's place in its square; default: the whole square).

    All Grad-CAM targets of all images go through one batched backward pass (each image repeated
    once per label it needs).
    """
    device = next(bundle.model.parameters()).device
    grey = torch.from_numpy(np.stack(squares)).unsqueeze(1).to(device)
    x = model_input(grey, bundle.preprocessing)
    placements = list(placements) if placements is not None else [WHOLE] * len(squares)
    size = x.shape[-1]
    attention = heatmaps.to_image(heatmaps.cls_attention(bundle.model, x).mean(dim=1), size)
    rollout = heatmaps.to_image(heatmaps.attention_rollout(bundle.model, x), size)
    rows = [i for i, names in enumerate(labels) for _ in names]
    targets = [bundle.labels.index(name) for names in labels for name in names]
    cams = (heatmaps.to_image(heatmaps.grad_cam(bundle.model, x[rows], targets), size) if rows
            else np.zeros((0, size, size), np.float32))
    out, k = [], 0
    for i, names in enumerate(labels):
        maps = {name: cams[k + j] for j, name in enumerate(names)}
        k += len(names)
        out.append(Explanation(attention[i], rollout[i], maps,
                               {n: peak_location(m, placements[i]) for n, m in maps.items()}))
    return out
