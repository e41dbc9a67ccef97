"""The one scoring pass: uint8 grey images -> logits / probabilities, as every part scores.

Validation (which tunes the thresholds, ``training.validation``), ``cxrvit eval``, ``cxrvit predict``
and ``cxrvit serve`` all come through :func:`score_logits`, so the probabilities the thresholds were
tuned on are the ones a user gets later, by construction rather than by a test holding two copies
equal. The pass: the whole image resized to the model size (:func:`~cxrvit.data.preprocess.eval_transform`),
with ``tta`` also a 90 % centre zoom whose logits are averaged in (no mirror view: the recipes do not
train on flipped films); the preprocessing's normalisation; a forward pass in the scoring precision
(:func:`cxrvit.runtime.inference_precision`, fp32), so an image's probability does not depend on the
batch around it, the command or the machine's bf16 support; a sigmoid.
"""
from __future__ import annotations

import torch
from torch import nn

from cxrvit.data.preprocess import Preprocessing, center_zoom, eval_transform, to_float
from cxrvit.runtime import autocast, inference_precision

#: Side fraction of the test-time-augmentation zoom view.
TTA_ZOOM = 0.9


def eval_views(images: torch.Tensor, size: int, tta: bool) -> list[torch.Tensor]:
    """The views of one batch whose logits are averaged: the whole image, plus the centre zoom with ``tta``."""
    views = [eval_transform(images, size)]
    if tta:
        views.append(center_zoom(to_float(images), size, TTA_ZOOM))
    return views


def model_input(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """``[B, 1, P, P]`` grey squares of any side -> the normalised model input of the scoring pass's first view
    (the whole image at ``prep.size``): what the heat-maps explain, so they see what was scored."""
    return prep.normalize(eval_transform(images, int(prep.size)))


@torch.no_grad()
def score_logits(model: nn.Module, images: torch.Tensor, prep: Preprocessing, size: int, tta: bool) -> torch.Tensor:
    """``[B, 1, S, S]`` grey images (uint8, or float in [0, 1]) on the model's device -> ``[B, K]`` fp32 logits.

    The caller puts the model in eval mode (validation restores training mode afterwards; a bundle stays
    in eval mode).
    """
    device = images.device
    precision = inference_precision(device)
    views = eval_views(images, size, tta)
    logits = None
    for view in views:
        with autocast(device, precision):
            out = model(prep.normalize(view)).float()
        logits = out if logits is None else logits + out
    return logits / len(views)


@torch.no_grad()
def _check_grey(grey: torch.Tensor) -> None:
    """What a library caller can get wrong silently: the pass reads uint8 as 0..255 and a float as 0..1, so a
    float image in 0..255 (or raw 12/16-bit values) would be scored, as a near-white picture, without a word."""
    if grey.ndim != 4 or grey.shape[1] != 1:
        raise ValueError(f"predict_proba: expected grey images [N, 1, S, S], got shape {tuple(grey.shape)} "
                         "(add the channel axis with x[:, None])")
    if grey.dtype == torch.uint8:
        return
    if not grey.dtype.is_floating_point:
        raise ValueError(f"predict_proba: {grey.dtype} images: pass uint8 (0..255) or float in [0, 1] "
                         "(cxrvit.data.images.to_uint8 maps a 12/16-bit radiograph to 8 bits as prepare does)")
    lo, hi = float(grey.min()), float(grey.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"predict_proba: float images must lie in [0, 1], these span {lo:g} to {hi:g} "
                         "(divide 0..255 values by 255, or pass them as uint8)")


def predict_proba(model: nn.Module, grey: torch.Tensor, prep: Preprocessing, tta: bool,
                  batch_size: int = 64) -> torch.Tensor:
    """``[N, 1, S, S]`` grey images (any device, N > 0) -> ``[N, K]`` probabilities on the CPU, ``batch_size``
    at a time. Puts the model in eval mode."""
    if len(grey) == 0:
        raise ValueError("predict_proba: no images to score (an empty batch)")
    _check_grey(grey)
    model.eval()
    device = next(model.parameters()).device
    size = int(prep.size)
    return torch.cat([torch.sigmoid(score_logits(model, grey[start:start + batch_size].to(device), prep, size, tta)).cpu()
                      for start in range(0, len(grey), batch_size)])
