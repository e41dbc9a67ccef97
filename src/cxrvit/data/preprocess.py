"""Turn prepared uint8 grey pixels into the model's input tensor.

One spec, saved in every model bundle, so that training, evaluation, prediction and exported
models all feed the network the same numbers: grey in [0, 1], repeated to 3 channels, then
normalised per channel. The default mean/std are ImageNet's, so a backbone trained elsewhere
with DINO/timm preprocessing sees the statistics it expects.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
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
