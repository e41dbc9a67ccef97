"""Batched view generation for self-supervised pre-training (GPU when present).

Every view is made on the whole batch tensor at once: one ``affine_grid`` + ``grid_sample`` per
crop set, per-sample random parameters drawn from a seeded ``torch.Generator`` (so a resumed run
draws the same crops as an uninterrupted one). Inputs and outputs are grey floats in [0, 1],
``[B, 1, H, W]``. The crop boxes and uniform draws are the supervised augmentation's
(:mod:`cxrvit.training.augment`); what is the SSL views' own is here: the flip, border padding and
DINO's exposure jitter, blur and solarisation.

Chest-X-ray choices (why these differ from ImageNet DINO): no horizontal flip by default
(laterality is anatomy: the heart is on the left, and dextrocardia is a finding), no colour jitter
(the images are grey) but brightness / contrast / gamma, which model exposure and processing
differences between scanners.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cxrvit.training.augment import crop_boxes, uniform


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        gen: torch.Generator, hflip: float = 0.0) -> torch.Tensor:
    """Crop a random box per sample (area fraction in ``scale``, aspect in ``ratio``) and resize it.

    The box is an affine map of the normalised [-1, 1] grid, so the crop and the resize are one
    bilinear ``grid_sample`` for the whole batch.
    """
    b = x.shape[0]
    half_w, half_h, cx, cy = crop_boxes(b, scale, ratio, gen)
    flip = torch.where(torch.rand(b, generator=gen) < hflip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = half_w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = half_h, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, 1, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Blur sample ``i`` with ``sigma[i]`` where ``apply[i]``: one grouped conv, one kernel per sample."""
    if not bool(apply.any()):
        return x
    b, _, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.to(x.device, x.dtype)[:, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)                       # [B, 2r+1], separable
    y = x.reshape(1, b, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(b, 1, 1, -1), groups=b)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(b, 1, -1, 1), groups=b)
    return torch.where(apply.to(x.device).view(b, 1, 1, 1), y.view(b, 1, h, w), x)


@dataclass
class Photometric:
    """Exposure-like jitter for grey radiographs; each part is applied per sample with its probability."""
    jitter_p: float = 0.8
    brightness: float = 0.4          # multiplicative: 1 +- brightness
    contrast: float = 0.4            # around the image mean: 1 +- contrast
    gamma: float = 0.4               # log-uniform in [1/(1+g), 1+g]
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_p: float = 0.0

    def __call__(self, x: torch.Tensor, gen: torch.Generator, *, blur_p: float | None = None,
                 solarize_p: float | None = None) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        on = (torch.rand(b, generator=gen) < self.jitter_p).float()
        bright = 1 + on * uniform(b, -self.brightness, self.brightness, gen)
        contrast = 1 + on * uniform(b, -self.contrast, self.contrast, gen)
        lg = math.log1p(self.gamma)
        gamma = torch.exp(on * uniform(b, -lg, lg, gen))
        view = lambda t: t.to(dev, x.dtype).view(b, 1, 1, 1)  # noqa: E731
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * view(contrast) + mean) * view(bright)
        x = x.clamp(0, 1).pow(view(gamma))
        p_blur = self.blur_p if blur_p is None else blur_p
        sigma = uniform(b, *self.blur_sigma, gen)
        x = gaussian_blur(x, sigma, torch.rand(b, generator=gen) < p_blur)
        p_sol = self.solarize_p if solarize_p is None else solarize_p
        sol = (torch.rand(b, generator=gen) < p_sol).to(dev).view(b, 1, 1, 1)
        x = torch.where(sol & (x >= 0.5), 1 - x, x)
        return x.clamp(0, 1)
