"""The DINO ViT-Small/16, with DINO's exact state_dict.

Parameter names and shapes match facebookresearch/dino ``vision_transformer.vit_small`` key for
key (150 backbone tensors + ``head.weight``/``head.bias``), so weights move between the two
projects with ``load_state_dict(strict=True)``. Forward semantics match too: the CLS token after
the final LayerNorm feeds the head.

Additions over DINO, none of which changes the state_dict:
- attention runs through ``F.scaled_dot_product_attention`` (fused kernels) or the explicit
  softmax, chosen per device and dtype (``attention="auto"``, see :func:`cxrvit.runtime.attention_path`)
  or forced (``"sdpa"`` / ``"explicit"``); attention probabilities always come from the explicit path;
- timm's model API: ``forward_features`` / ``forward_head``, ``no_weight_decay``, and ``layer_id_for``
  (the layer of a parameter, for layer-wise learning-rate decay: ``cxrvit.engine.optim.param_groups``);
- grey inputs: a ``[B, 1, H, W]`` image is repeated to 3 channels (see ``fold_patch_embed_to_grey``
  for why that is exact and for the one-channel equivalent);
- ``pos_embed="sincos"`` starts the position embedding from MAE's fixed 2-D sine-cosine table instead of
  DINO's trunc-normal(0.02) noise: only the initial values differ, the parameter is the same.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cxrvit.runtime import ATTENTION_PATHS, attention_path


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: drop the whole residual branch, rescale the survivors."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop_p = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attention = "auto"  # a plain attribute, not a buffer: the state_dict stays DINO's

    def _qkv(self, x: torch.Tensor):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        b, n, c = x.shape
        q, k, v = self._qkv(x)
        path = attention_path(q.device, q.dtype) if self.attention == "auto" else self.attention
        if return_attention or path == "explicit":
            # The probabilities themselves are wanted (DINO's maps, rollout), or the explicit product is
            # the faster kernel here (CPU bf16: SDPA's fused backward is up to 1.8x slower, issue 13).
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = F.dropout(attn, self.attn_drop_p, self.training) @ v
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop_p if self.training else 0.0)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
        return (out, attn) if return_attention else out


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if return_attention:
            y, attn = self.attn(self.norm1(x), return_attention=True)
            x = x + self.drop_path(y)
            x = x + self.drop_path(self.mlp(self.norm2(x)))
            return x, attn
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


POS_EMBED_INITS = ("random", "sincos")
# What forward_head reads, and how many embed_dim-wide pieces it hands the head per block read: the CLS token, the
# mean of the patch tokens, their per-channel mean and max side by side (timm's ViT "avgmax" *averages* the two;
# this one keeps both, like timm's CNN "catavgmax"), or the CLS token and the patch mean side by side.
GLOBAL_POOLS = {"token": 1, "avg": 1, "avgmax": 2, "token+avg": 2}


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine table ``[1, (1 +) grid*grid, dim]`` (CLS position = zeros)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):  # first half encodes the row, second the column
        out = coord[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    table = torch.cat(parts, dim=1).float()
    if cls_token:
        table = torch.cat((torch.zeros(1, dim), table), dim=0)
    return table.unsqueeze(0)


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINO's ViT. ``img_size`` only sets the stored position-embedding grid (224 -> 14x14)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, eps: float = 1e-6, attention: str = "auto",
                 pos_embed: str = "random", global_pool: str = "token", n_last_blocks: int = 1):
        super().__init__()
        if pos_embed not in POS_EMBED_INITS:
            raise ValueError(f"unknown pos_embed init {pos_embed!r}; choose from {POS_EMBED_INITS}")
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"unknown global_pool {global_pool!r}; choose from {tuple(GLOBAL_POOLS)}")
        if not 1 <= n_last_blocks <= depth:
            raise ValueError(f"n_last_blocks {n_last_blocks} must be in 1..{depth} (the model has {depth} blocks)")
        self.global_pool = global_pool
        self.n_last_blocks = n_last_blocks
        self.embed_dim = embed_dim
        # what the head reads: forward_features' last axis, twice over for the paired read-outs
        self.num_features = embed_dim * n_last_blocks * GLOBAL_POOLS[global_pool]
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # deeper blocks dropped more often
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rates[i], eps)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0 and self.num_features != embed_dim:
            # A wider head drawn from the global generator would shift every draw after it (positions, CLS,
            # all blocks): the same seed must give the same backbone whatever the head reads, so that a
            # random-backbone control differs from its twin only in the read-out.
            with torch.random.fork_rng(devices=[]):
                self.head = nn.Linear(self.num_features, num_classes)
        if pos_embed == "sincos":
            # Random positions at std 0.02 are ~30x smaller than the patch tokens (std ~0.7), so an untrained
            # ViT is a bag of patches: its features cannot say *where* an opacity is. The sin-cos table
            # (amplitude 1) makes position as loud as content from the first step (docs/training.md).
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed(embed_dim, int(math.isqrt(self.patch_embed.num_patches))))
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)
        set_attention(self, attention)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- input ---------------------------------------------------------------------------------
    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The stored position grid for an ``h`` x ``w`` pixel input (multiples of 16), resampled as DINO does."""
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        gh, gw = h // self.patch_size, w // self.patch_size
        if npatch == n and gh == gw:
            return self.pos_embed
        return dino_resample_pos_embed(self.pos_embed, gh, gw)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if c == 1:
            x = x.expand(-1, 3, -1, -1)  # grey CXR: the same picture in all three channels
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        return self.pos_drop(x)

    # -- timm-style API ------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, ``[B, 1 + N, D]``; with ``n_last_blocks`` = n > 1 the normed
        outputs of the last n blocks side by side, ``[B, 1 + N, n * D]`` (oldest first)."""
        return self.forward_blocks(self.prepare_tokens(x))

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_features`` from prepared tokens (patches embedded, positions added)."""
        kept = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            # MAE with a shallow decoder leaves its last encoder blocks busy reconstructing pixels, so a probe
            # reads earlier blocks too (DINO's linear evaluation of ViT-S concatenates the last 4).
            if len(self.blocks) - i <= self.n_last_blocks:
                kept.append(self.norm(x))
        return kept[0] if len(kept) == 1 else torch.cat(kept, dim=-1)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # "token" reads the CLS token (DINO trains it); "avg" the mean of the patch tokens, for backbones whose
        # objective never touches the CLS token (MAE reconstructs patches: what it learned lives in them).
        # "avgmax" adds the per-channel max over the patches: a nodule covers a few of 196 patches, and the mean
        # divides their signal by ~100 (NIH's ChestX-ray8 paper pooled with log-sum-exp, between mean and max,
        # for such localised findings). "token+avg" hands the head the CLS token and the patch mean side by side
        # (DINO's linear evaluation with avgpool_patchtokens): MAE's CLS token is never in its loss, yet it attends
        # over the patches in every block, a second summary of them. Only the head's width depends on the choice;
        # the backbone is DINO's.
        cls, patches = features[:, 0], features[:, 1:]
        if self.global_pool == "token":
            pooled = cls
        elif self.global_pool == "avg":
            pooled = patches.mean(1)
        elif self.global_pool == "avgmax":
            pooled = torch.cat((patches.mean(1), patches.amax(1)), dim=-1)
        else:
            pooled = torch.cat((cls, patches.mean(1)), dim=-1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- DINO's inspection API -----------------------------------------------------------------
    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the last block, ``[B, heads, 1 + N, 1 + N]``."""
        return self.get_all_selfattentions(x)[-1]

    def get_all_selfattentions(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention probabilities of every block (for attention rollout)."""
        x = self.prepare_tokens(x)
        maps = []
        for blk in self.blocks:
            x, attn = blk(x, return_attention=True)
            maps.append(attn)
        return maps

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Normed outputs of the last ``n`` blocks, as DINO's linear evaluation uses them."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x))
        return out

    # -- optimiser helpers ---------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


def set_attention(module: nn.Module, path: str) -> nn.Module:
    """Set the attention path of every :class:`Attention` inside ``module`` (a ViT, or an SSL method
    with its decoder/predictor blocks): ``auto`` (per device and dtype), ``sdpa`` or ``explicit``.

    Both paths compute the same function on the same parameters, so this never touches the state_dict.
    """
    if path not in ATTENTION_PATHS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_PATHS)}, not {path!r}")
    for m in module.modules():
        if isinstance(m, Attention):
            m.attention = path
    return module


def layer_id_for(name: str, depth: int) -> int:
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def dino_resample_pos_embed(pos_embed: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding``: bicubic, by a scale factor of (grid + 0.1) / stored side.

    The scale factor, not a target size, is what DINO passes, and it also sets where the bicubic samples fall:
    the same weights give other features at 96-448 px resized to a target size instead (a random ViT-S/16 with
    the sin-cos table: CLS features up to 6.5e-2 apart at 96 px, mean |CLS| 0.8; docs/model.md). We add 0.1 to avoid floating point error in the interpolation (DINO's own note; its
    issue #8): ``floor(side * g / side)`` can come out one short. Rows are scaled by the grid's height and columns
    by its width, as in DINO (whose ``prepare_tokens`` names the height ``w``); the one difference, visible only for
    a non-square input, is that DINO also resamples an axis already at the stored side, by (side + 0.1) / side."""
    prefix, patch = pos_embed[:, :1], pos_embed[:, 1:]
    n, d = patch.shape[1], patch.shape[2]
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"position embedding has {n} patch positions, not a square grid")
    grid = patch.reshape(1, side, side, d).permute(0, 3, 1, 2).float()
    # An axis already at the stored side keeps its positions (scale 1), as DINO keeps the whole table at its size.
    scale = tuple(1.0 if g == side else (g + 0.1) / side for g in (gh, gw))
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
    if grid.shape[-2:] != (gh, gw):
        raise ValueError(f"position table resampled to {tuple(grid.shape[-2:])}, not the input's grid {(gh, gw)}")
    return torch.cat((prefix, grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, d)), dim=1)


def vit_small(num_classes: int = 0, patch_size: int = 16, **kwargs) -> VisionTransformer:
    """DINO's ``vit_small``: patch 16, dim 384, depth 12, 6 heads, MLP 4x, qkv bias, LN eps 1e-6."""
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
                             qkv_bias=True, num_classes=num_classes, **kwargs)


def vit_tiny(num_classes: int = 0, patch_size: int = 16, **kwargs) -> VisionTransformer:
    """DINO's ``vit_tiny`` (dim 192, 3 heads): same code path, used by fast tests only."""
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4,
                             qkv_bias=True, num_classes=num_classes, **kwargs)


ARCHITECTURES = {"vit_small": vit_small, "vit_tiny": vit_tiny}


def build_model(arch: str = "vit_small", **kwargs) -> VisionTransformer:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)


def fold_patch_embed_to_grey(weight: torch.Tensor, bias: torch.Tensor, mean: Iterable[float], std: Iterable[float]):
    """Fold a 3-channel patch filter, normalised per channel, into one filter on raw grey in [0, 1].

    With every channel equal to the grey value ``g``, channel ``c`` sees ``(g - m_c) / s_c``, so
    ``sum_c W_c * (g - m_c) / s_c = (sum_c W_c / s_c) * g - sum_c (m_c / s_c) * sum(W_c)``.
    The result is exact (up to float rounding), which is why cxrvit can keep the 3-channel,
    DINO-compatible state_dict and still feed grey images: repeating the channel is the same thing.
    """
    mean_t = torch.as_tensor(list(mean), dtype=weight.dtype).view(1, 3, 1, 1)
    std_t = torch.as_tensor(list(std), dtype=weight.dtype).view(1, 3, 1, 1)
    grey_weight = (weight / std_t).sum(dim=1, keepdim=True)
    grey_bias = bias - (weight * (mean_t / std_t)).sum(dim=(1, 2, 3))
    return grey_weight, grey_bias
