"""The ViT encoder as the SSL methods use it, and the exported backbone.

All three methods train the very same :class:`~cxrvit.model.vit.VisionTransformer` that
fine-tuning uses, so the result is a DINO-layout backbone with no key renaming. MAE and I-JEPA
run it on a *subset* of patch tokens; :func:`encode` does that with the model's own modules
(patch_embed, cls_token, pos_embed, blocks, norm) instead of a second ViT implementation.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from cxrvit.model.checkpoints import save_weights
from cxrvit.model.vit import VisionTransformer, sincos_pos_embed

#: (embed_dim, heads) of the architectures ``cxrvit.model.vit`` ships; depth is configurable
#: here so tests can use a 2-block encoder with the same code path.
ARCH_DIMS = {"vit_small": (384, 6), "vit_tiny": (192, 3)}
BACKBONE_FILE = "backbone.safetensors"


def build_encoder(arch: str = "vit_small", depth: int = 12, patch_size: int = 16,
                  drop_path_rate: float = 0.0) -> VisionTransformer:
    """A headless ViT. ``img_size`` stays 224 so the stored position grid is DINO's 14x14."""
    if arch not in ARCH_DIMS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCH_DIMS)}")
    dim, heads = ARCH_DIMS[arch]
    return VisionTransformer(img_size=224, patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads,
                             mlp_ratio=4, qkv_bias=True, num_classes=0, drop_path_rate=drop_path_rate)


def encode(vit: VisionTransformer, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``vit`` on the CLS token plus the patch tokens ``keep`` (``[B, n]`` indices, or all).

    The tokens are the model's own (:meth:`~cxrvit.model.vit.VisionTransformer.prepare_tokens`: patch
    embedding, CLS, positions), so position embeddings are added *before* dropping tokens and each kept
    token still knows where it came from - what MAE's encoder and I-JEPA's context encoder need. Returns
    the normed tokens ``[B, 1 + n, D]``, CLS first, exactly ``forward_features`` when ``keep`` is None.
    """
    tokens = vit.prepare_tokens(x)
    if keep is not None:
        patches = torch.gather(tokens[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        tokens = torch.cat((tokens[:, :1], patches), dim=1)
    for blk in vit.blocks:
        tokens = blk(tokens)
    return vit.norm(tokens)


def init_sincos_pos_embed(vit: VisionTransformer) -> None:
    """Give ``vit`` MAE/I-JEPA's fixed sin-cos positions (both papers keep them frozen)."""
    grid = int(math.isqrt(vit.pos_embed.shape[1] - 1))
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_pos_embed(vit.embed_dim, grid))
    vit.pos_embed.requires_grad_(False)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, over parameters with matching names."""
    t_params = dict(teacher.named_parameters())
    pairs = [(t_params[name], p.detach()) for name, p in student.named_parameters()]
    # One multi-tensor kernel per op instead of 2 x 150 small ones: the same arithmetic (mul then add,
    # so bit-identical to the per-parameter loop), without the Python/dispatch cost per tensor.
    teach, stud = [t for t, _ in pairs], [s for _, s in pairs]
    torch._foreach_mul_(teach, momentum)
    torch._foreach_add_(teach, stud, alpha=1.0 - momentum)


def backbone_state(vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """The DINO-layout backbone tensors (150 for a 12-block ViT; a headless model has no head keys)."""
    return {k: v.detach().float().contiguous().cpu() for k, v in vit.state_dict().items()
            if not k.startswith("head.")}


def export_backbone(vit: VisionTransformer, path: os.PathLike | str, *, arch: str, method: str,
                    cls_token: str, extra: dict | None = None) -> Path:
    """Write the encoder as ``backbone.safetensors`` (atomic) with metadata saying where it came from.

    ``cls_token`` documents how the CLS token was obtained (trained by the objective, or only
    through attention), since fine-tuning reads the classifier from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "layout": "dino", "arch": arch, "depth": str(len(vit.blocks)),
            "patch_size": str(vit.patch_size), "method": method, "cls_token": cls_token,
            **{k: str(v) for k, v in (extra or {}).items()}}
    return save_weights(backbone_state(vit), path, meta)


def write_half_copy(backbone: os.PathLike | str, out: os.PathLike | str) -> Path:
    """A float16 copy of an exported ``backbone.safetensors`` (atomic): half the bytes (ViT-S/16: 43 MB, what
    a repository can ship), metadata kept plus the source file's sha256. Loading casts back to the model's
    dtype. float16 rather than bfloat16: its 10-bit mantissa keeps weights ~8x closer than bf16's 7 bits,
    and a ViT's weights stay far inside its range (checked: a value that would overflow is an error)."""
    backbone, out = Path(backbone), Path(out)
    with safe_open(str(backbone), framework="pt") as f:
        meta = dict(f.metadata() or {})
    state = load_file(str(backbone))
    for key, t in state.items():
        if t.is_floating_point() and t.abs().max().item() >= torch.finfo(torch.float16).max:
            raise ValueError(f"{backbone}: {key} holds values beyond float16's range; keep the float32 file")
    half = {k: (t.to(torch.float16) if t.is_floating_point() else t).contiguous() for k, t in state.items()}
    digest = hashlib.sha256(backbone.read_bytes()).hexdigest()
    meta.update(dtype="float16", source=backbone.name, source_sha256=digest)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_weights(half, out, meta)
