"""Turn prepared uint8 grey pixels into the model's input tensor.

One spec, saved in every model bundle, so that training, evaluation, prediction and exported
models all feed the network the same numbers: grey in [0, 1], repeated to 3 channels, then
normalised per channel. The default mean/std are ImageNet's, so a backbone trained elsewhere
with DINO/timm preprocessing sees the statistics it expects.

The evaluation geometry lives here too (the whole image resized to the model size, and the 90 %
centre zoom of test-time augmentation), below every part that scores or trains: validation, the
linear probe, ``eval``, ``predict`` and ``serve`` all take their views from this one place.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocessing:
    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels: str = "grey-repeated-to-3"
    geometry: str = "pad-to-square-with-image-minimum, then bilinear resize"
    extra: dict = field(default_factory=dict)
    #: Side of the uint8 squares the model's training and validation images were cached at (``cxrvit prepare
    #: --size``; ``CXRCache.size``), which validation then resized to ``size`` in float (:func:`eval_transform`).
    #: ``predict`` and ``serve`` square a file to this side with the cache's geometry, so a file scores as its
    #: cache row does. None (bundles written before the field): they square to ``size`` instead.
    source_size: int | None = None

    def __post_init__(self) -> None:
        side = self.source_size
        if side is not None:
            if isinstance(side, bool) or not isinstance(side, (int, float)) or side != int(side) or side < 1:
                raise ValueError(f"preprocessing.source_size must be a positive whole number, got {side!r}")
            self.source_size = int(side)

    @property
    def square_size(self) -> int:
        """Side of the uint8 square a file is fitted to before the scoring pass resizes it to ``size``: the
        cache's (``source_size``) when the bundle records it, else the model's."""
        return int(self.source_size or self.size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if d["source_size"] is None:  # bundle.json stays as it was (and readable by older versions) without it
            del d["source_size"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def normalize(self, grey: torch.Tensor) -> torch.Tensor:
        """``[B, 1, H, W]`` grey (uint8 0..255, or float 0..1) -> normalised ``[B, 3, H, W]`` float."""
        if grey.dtype == torch.uint8:
            grey = grey.float().div_(255.0)
        mean = torch.tensor(self.mean, device=grey.device, dtype=grey.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=grey.device, dtype=grey.dtype).view(1, 3, 1, 1)
        return (grey.expand(-1, 3, -1, -1) - mean) / std


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1 (float input is passed through)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of a float ``[B, C, H, W]`` batch to ``size`` x ``size``."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def eval_transform(images: torch.Tensor, size: int) -> torch.Tensor:
    """Validation/test input: the whole image, resized to ``size``; grey float in [0, 1]."""
    return resize_batch(to_float(images), size)


def center_zoom(x: torch.Tensor, size: int, fraction: float) -> torch.Tensor:
    """The central ``fraction`` of the side, resized to ``size`` (a mild zoom-in view for TTA)."""
    side = x.shape[-1]
    crop = max(1, round(side * fraction))
    off = (side - crop) // 2
    return resize_batch(x[..., off:off + crop, off:off + crop], size)
