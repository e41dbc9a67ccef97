"""Batched augmentation of grey CXR batches, on whatever device the batch lives on.

One ``affine_grid`` + ``grid_sample`` per batch does random-resized-crop, rotation, shear,
translation, flip *and* the resize to the training size at once: every sample gets its own
2x3 matrix, so there is no per-image Python and no second interpolation. Photometric changes
(gamma, contrast, brightness) are per-sample broadcasts. Mixup/cutmix mix images and their
multi-hot targets with the same weight.

All random numbers come from a CPU ``torch.Generator`` owned by :class:`BatchAugment`
(parameters are tiny: a few floats per image, moved to the device afterwards). Its state is
saved in checkpoints, so a resumed run draws exactly the same augmentations, on CPU or GPU.

The random-resized-crop box (:func:`crop_boxes`) and the uniform draws (:func:`uniform`) are also
what the self-supervised views use (:mod:`cxrvit.ssl.views`): one implementation, each caller
keeping only its own composition (rotation/shear/photometrics here; flips and DINO's jitter there).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cxrvit.data.preprocess import resize_batch, to_float
from cxrvit.training.config import AugmentConfig


def uniform(n: int, low: float, high: float, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` draws from U[low, high) off the CPU generator ``gen``."""
    return torch.rand(n, generator=gen, dtype=dtype) * (high - low) + low


def crop_boxes(n: int, scale, ratio, gen: torch.Generator, dtype: torch.dtype = torch.float32):
    """Random-resized-crop boxes in the normalised [-1, 1] frame: ``(w, h, cx, cy)``, ``[n]`` each.

    ``w``/``h`` are the crop's sides as fractions of the image's (area fraction in ``scale``, log-uniform
    aspect in ``ratio``) - equally the half-extents in [-1, 1] units; ``cx``/``cy`` centres that keep the
    box inside. A box larger than the image is clamped (torchvision retries and then falls back to a
    centre crop; clamping is its batched analogue). Four draws per sample, in this order.
    """
    area = uniform(n, scale[0], scale[1], gen, dtype)
    aspect = torch.exp(uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen, dtype))
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = uniform(n, -1.0, 1.0, gen, dtype) * (1 - w)
    cy = uniform(n, -1.0, 1.0, gen, dtype) * (1 - h)
    return w, h, cx, cy


class BatchAugment:
    def __init__(self, cfg: AugmentConfig, out_size: int, seed: int = 0):
        self.cfg = cfg
        self.out_size = out_size
        self.generator = torch.Generator().manual_seed(seed)

    # -- state for checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    # -- random parameters -------------------------------------------------------------------
    def _uniform(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return uniform(n, lo, hi, self.generator, torch.float64)   # float64: the matrices are composed below

    def sample_affine(self, n: int) -> torch.Tensor:
        """``[n, 2, 3]`` matrices mapping output coordinates to input coordinates (both in [-1, 1])."""
        c = self.cfg
        w, h, cx, cy = crop_boxes(n, c.scale, c.ratio, self.generator, torch.float64)
        angle = torch.deg2rad(self._uniform(n, -c.rotate, c.rotate))
        shear = torch.tan(torch.deg2rad(self._uniform(n, -c.shear, c.shear)))
        tx = self._uniform(n, -c.translate, c.translate) * 2  # fraction of the side -> [-1, 1] units
        ty = self._uniform(n, -c.translate, c.translate) * 2
        flip = torch.rand(n, generator=self.generator, dtype=torch.float64) < c.hflip

        cos, sin = torch.cos(angle), torch.sin(angle)
        # A = diag(w, h) @ R(angle) @ Shear_x ; b = diag(w, h) @ t + centre
        a00, a01 = cos, cos * shear - sin
        a10, a11 = sin, sin * shear + cos
        theta = torch.stack([
            torch.stack([w * a00, w * a01, w * tx + cx], dim=1),
            torch.stack([h * a10, h * a11, h * ty + cy], dim=1),
        ], dim=1)
        theta[:, :, 0] = torch.where(flip[:, None], -theta[:, :, 0], theta[:, :, 0])
        return theta

    def sample_photometric(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.cfg
        g = math.log1p(c.gamma)
        gamma = torch.exp(self._uniform(n, -g, g))
        contrast = self._uniform(n, 1 - c.contrast, 1 + c.contrast)
        brightness = self._uniform(n, -c.brightness, c.brightness)
        return gamma, contrast, brightness

    # -- application -------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, targets: torch.Tensor | None = None,
                 draw: int | None = None, take: slice | torch.Tensor | None = None):
        """Augment ``images`` (uint8 or float ``[B, 1, S, S]``) -> float ``[B, 1, T, T]`` in [0, 1].

        ``draw``/``take``: parameters are drawn for ``draw`` samples and only positions ``take`` are used. Under
        DDP every rank draws for the *global* batch and keeps its own samples, so a 2-process run
        sees exactly the augmentations of a 1-process run with the same global batch. Not so for
        mixup/cutmix (:meth:`mix`): they pair images within the batch given, i.e. within a rank's share.
        """
        c = self.cfg
        x = to_float(images)
        if not c.enabled:
            return resize_batch(x, self.out_size), targets
        theta = self.sample_affine(len(x) if draw is None else draw)
        gamma, contrast, brightness = self.sample_photometric(len(theta))
        if take is not None:
            theta, gamma, contrast, brightness = theta[take], gamma[take], contrast[take], brightness[take]
        if len(theta) != len(x):
            raise ValueError(f"augment: {len(theta)} parameter sets for a batch of {len(x)}")

        # Downsampling by grid_sample aliases; bring big cache images close to the output scale
        # first (antialiased), keeping enough pixels for the smallest crop.
        pre = min(x.shape[-1], math.ceil(self.out_size / math.sqrt(c.scale[0])))
        x = resize_batch(x, pre)
        dev = x.device
        grid = F.affine_grid(theta.to(dev, torch.float32), [len(x), x.shape[1], self.out_size, self.out_size],
                             align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        view = (-1, 1, 1, 1)
        if c.gamma > 0:
            x = x.clamp(min=0).pow(gamma.to(dev, torch.float32).view(view))
        if c.contrast > 0:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * contrast.to(dev, torch.float32).view(view) + mean
        if c.brightness > 0:
            x = x + brightness.to(dev, torch.float32).view(view)
        x = x.clamp(0.0, 1.0)

        if targets is not None and c.mix_prob > 0 and (c.mixup > 0 or c.cutmix > 0):
            x, targets = self.mix(x, targets)
        return x, targets

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-label mixup or cutmix: pair each image with another from the batch; targets are
        mixed with the same weight (soft multi-hot: a finding visible in 30% of the pixels is 0.3).

        The partner comes from ``x`` only: under DDP, from this rank's share of the global batch, so an N-process
        run mixes other pairs (and draws other weights) than one process would; no gather makes them equal."""
        c = self.cfg
        if torch.rand(1, generator=self.generator).item() >= c.mix_prob:
            return x, y
        perm = torch.randperm(len(x), generator=self.generator).to(x.device)
        # Beta draws via numpy, seeded from our generator, so the only state to save stays ours.
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=self.generator)))
        use_cutmix = c.cutmix > 0 and (c.mixup <= 0 or rng.random() < 0.5)
        if use_cutmix:
            lam = rng.beta(c.cutmix, c.cutmix)
            side = x.shape[-1]
            cut = int(round(side * math.sqrt(1 - lam)))
            cy, cx = rng.integers(0, side, size=2)
            y0, y1 = max(cy - cut // 2, 0), min(cy + cut // 2, side)
            x0, x1 = max(cx - cut // 2, 0), min(cx + cut // 2, side)
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / side**2
        else:
            lam = rng.beta(c.mixup, c.mixup)
            x = lam * x + (1 - lam) * x[perm]
        return x, lam * y + (1 - lam) * y[perm]

