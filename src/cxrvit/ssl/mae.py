"""MAE (He et al., 2022): hide most patches, encode the rest, reconstruct the hidden pixels.

The ViT-S encoder sees only the visible patches (plus CLS), which is what makes a 0.9 mask ratio
cheap: 10% of the tokens. A light decoder (narrower, shallower: it is thrown away) gets the
encoded tokens back in place with a shared mask token at the hidden positions and predicts each
hidden patch's grey pixels, normalised per patch (``norm_pix``: the loss then rewards structure,
not overall exposure). Medical-MAE (Xiao et al., 2023) found 0.9 the best ratio on chest X-rays.

A deliberate deviation from MAE's code: its ``initialize_weights`` uses xavier_uniform for every Linear layer
and the flattened patch-embedding weight; here encoder and decoder keep DINO's ViT init (trunc-normal, std 0.02).
At ViT-S/16 that is std 0.0208 vs 0.0417 (patch embedding), 0.0200 vs 0.0361 (encoder qkv), 0.0200 vs 0.0323
(encoder fc1), 0.0200 vs 0.0559 / 0.0442 / 0.0625 (decoder embed / qkv / pred). Kept because the product's
backbone (``mae224``) was pre-trained with it and must stay reproducible (docs/ssl.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cxrvit.data.preprocess import Preprocessing
from cxrvit.model.vit import Block, VisionTransformer, sincos_pos_embed
from cxrvit.ssl.encoder import encode, init_sincos_pos_embed
from cxrvit.ssl.masking import random_masking
from cxrvit.ssl.views import random_resized_crop


@dataclass
class MaeConfig:
    mask_ratio: float = 0.9
    decoder_dim: int = 256
    decoder_depth: int = 4
    decoder_heads: int = 8
    norm_pix_loss: bool = True
    size: int = 224
    scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  # random-resized-crop area
    hflip: float = 0.0

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mae.mask_ratio must be in (0, 1), got {self.mask_ratio}")


def patchify(grey: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, 1, H, W]`` -> ``[B, N, p*p]`` in the row-major order of the patch grid."""
    b, _, h, w = grey.shape
    x = grey.reshape(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4)
    return x.reshape(b, (h // p) * (w // p), p * p)


class MAEDecoder(nn.Module):
    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, patch_pixels: int):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(VisionTransformer._init_weights)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor, num_patches: int, grid: int) -> torch.Tensor:
        x = self.embed(tokens)
        b, d = x.shape[0], x.shape[-1]
        # Scatter encoded tokens back to their positions; every other position gets the mask token.
        # The canvas takes the tokens' dtype: under bf16 autocast ``x`` is bf16 while the parameter is
        # fp32, and scatter does not promote (it raised on every bf16 machine). The out-of-place
        # scatter keeps the mask token's gradient flowing through the cast and the expand.
        canvas = self.mask_token.to(x.dtype).expand(b, num_patches, d)
        full = canvas.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), x[:, 1:])
        full = torch.cat((x[:, :1], full), dim=1)
        full = full + sincos_pos_embed(d, grid).to(full.device, full.dtype)
        for blk in self.blocks:
            full = blk(full)
        return self.pred(self.norm(full))[:, 1:]


class MAE(nn.Module):
    method = "mae"
    clip_mode = "global"  # `optim.clip_grad` bounds the total norm (0 in the recipes: MAE's reference does not clip)
    cls_token_note = ("learnt through attention only: MAE's encoder carries a CLS token that no loss "
                      "reads directly (as in MAE); fine-tuning trains it, or pool patch tokens")
    momentum_base = None  # no EMA model

    def __init__(self, encoder: VisionTransformer, cfg: MaeConfig, preprocessing: Preprocessing):
        super().__init__()
        self.cfg = cfg
        self.pre = preprocessing
        self.encoder = encoder
        init_sincos_pos_embed(encoder)
        p = encoder.patch_size
        self.decoder = MAEDecoder(encoder.embed_dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, p * p)

    def step_kwargs(self, epoch: float) -> dict:
        return {}

    def make_inputs(self, x: torch.Tensor, gen: torch.Generator) -> tuple:
        grey = random_resized_crop(x, self.cfg.size, self.cfg.scale, (0.75, 1.3333333), gen, self.cfg.hflip)
        grid = self.cfg.size // self.encoder.patch_size
        keep, masked = random_masking(len(grey), grid * grid, self.cfg.mask_ratio, gen)
        return grey, keep.to(grey.device), masked.to(grey.device)

    def forward(self, grey: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor):
        p = self.encoder.patch_size
        grid = grey.shape[-1] // p
        tokens = encode(self.encoder, self.pre.normalize(grey), keep)
        pred = self.decoder(tokens, keep, grid * grid, grid).float()
        target = patchify(grey, p)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        idx = masked.unsqueeze(-1).expand(-1, -1, pred.shape[-1])
        loss = (torch.gather(pred, 1, idx) - torch.gather(target, 1, idx)).pow(2).mean()
        return loss, {"visible_tokens": keep.shape[1]}

    def after_backward(self, epoch: float) -> None:
        pass

    def after_step(self, momentum: float) -> None:
        pass

    def export_encoder(self) -> VisionTransformer:
        return self.encoder
