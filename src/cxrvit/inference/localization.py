"""Score explanation maps against NIH's radiologist boxes: pointing game and heat mass in the box.

NIH's ``BBox_List_2017.csv`` gives 984 boxes (8 findings) as ``x, y, w, h`` in the coordinates
of the original 1024 x 1024 images. A heat-map lives on the model's input square, which is the
image padded to a square and resized, so a box goes through the same two steps
(:func:`box_to_model`): scale from 1024 px to the file's actual size, then apply the pad/resize.

Two scores per map and box (both standard in the weakly-supervised localisation literature):

- **pointing game** (Zhang et al. 2016): a hit when the map's maximum lies inside the box;
- **mass in box**: the share of the map's total (non-negative) mass that falls inside the box.
  A uniform map scores the box's area fraction, which is printed next to it for reference.

The baseline is a **centre-of-image** map, an isotropic Gaussian at the centre (sigma = a quarter
of the side): a method that does not beat it has not shown it localises anything.
"""
from __future__ import annotations

from dataclasses import dataclass


import numpy as np
import pandas as pd

NIH_ORIGINAL_SIZE = 1024


@dataclass(frozen=True)
class Box:
    """Axis-aligned box ``[x0, x1) x [y0, y1)`` in pixels of some image."""

    x0: float
    y0: float
    x1: float
    y1: float

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """Pixels whose centres lie inside the box (at least the one pixel containing its centre)."""
        h, w = shape
        ys, xs = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
        m = (xs >= self.x0) & (xs < self.x1) & (ys >= self.y0) & (ys < self.y1)
        if not m.any():
            cy = int(np.clip((self.y0 + self.y1) / 2, 0, h - 1))
            cx = int(np.clip((self.x0 + self.x1) / 2, 0, w - 1))
            m[cy, cx] = True
        return m


def box_to_model(x: float, y: float, w: float, h: float, image_shape: tuple[int, int], size: int,
                 original_size: int = NIH_ORIGINAL_SIZE) -> Box:
    """Map a box from ``original_size`` px coordinates to the model's ``size`` x ``size`` input.

    ``image_shape`` (rows, cols) is the decoded file's shape; the original is assumed square, as
    every NIH image is. Then the same pad-to-square and resize as ``images.square_resize``.
    """
    rows, cols = image_shape
    sx, sy = cols / original_size, rows / original_size
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    k = size / side
    return Box((x * sx + left) * k, (y * sy + top) * k, ((x + w) * sx + left) * k, ((y + h) * sy + top) * k)


def pointing_hit(heat: np.ndarray, box: Box) -> bool:
    """True when the map's maximum lies in the box (ties: any maximal pixel counts)."""
    peak = heat >= heat.max()
    return bool((peak & box.mask(heat.shape)).any())


def mass_in_box(heat: np.ndarray, box: Box) -> float:
    """Share of the map's non-negative mass inside the box."""
    heat = np.clip(heat, 0, None)
    total = float(heat.sum())
    return float(heat[box.mask(heat.shape)].sum()) / total if total > 0 else 0.0


def centre_baseline(size: int, sigma_fraction: float = 0.25) -> np.ndarray:
    """An isotropic Gaussian at the image centre: the map that 'looks where findings usually are'."""
    c = np.arange(size) + 0.5 - size / 2
    g = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * (sigma_fraction * size) ** 2))
    return (g / g.max()).astype(np.float32)


@dataclass
class LocalizationRecord:
    image: str
    finding: str
    method: str
    hit: bool
    mass: float
    box_area_fraction: float


def score_map(image: str, finding: str, method: str, heat: np.ndarray, box: Box) -> LocalizationRecord:
    area = float(box.mask(heat.shape).mean())
    return LocalizationRecord(image, finding, method, pointing_hit(heat, box), mass_in_box(heat, box), area)


def summarize(records: list[LocalizationRecord]) -> pd.DataFrame:
    """Per finding (and 'all') x method: n, pointing hit rate, mean mass in box, mean box area."""
    if not records:
        return pd.DataFrame(columns=["finding", "method", "n", "pointing", "mass_in_box", "box_area"])
    df = pd.DataFrame([r.__dict__ for r in records])
    parts = [df, df.assign(finding="all")]
    table = (pd.concat(parts).groupby(["finding", "method"], sort=True)
             .agg(n=("hit", "size"), pointing=("hit", "mean"), mass_in_box=("mass", "mean"),
                  box_area=("box_area_fraction", "mean"))
             .reset_index())
    return table


def markdown_table(table: pd.DataFrame, methods: list[str]) -> str:
    """One row per finding; for each method 'pointing / mass' columns."""
    head = "| finding | n | box area | " + " | ".join(f"{m} pointing | {m} mass" for m in methods) + " |"
    sep = "|" + " --- |" * (3 + 2 * len(methods))
    lines = [head, sep]
    findings = sorted(set(table["finding"]) - {"all"}) + ["all"]
    for f in findings:
        sub = table[table["finding"] == f].set_index("method")
        if sub.empty:
            continue
        first = sub.iloc[0]
        cells = []
        for m in methods:
            if m in sub.index:
                cells += [f"{sub.loc[m, 'pointing']:.2f}", f"{sub.loc[m, 'mass_in_box']:.3f}"]
            else:
                cells += ["–", "–"]
        lines.append(f"| {f} | {int(first['n'])} | {first['box_area']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
