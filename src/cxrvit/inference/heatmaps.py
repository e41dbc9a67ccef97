"""Where the model looked: three explanation maps for a ViT and their PNG overlays.

- **CLS attention** (Caron et al., DINO 2021): the last block's attention from the CLS token to
  every patch, per head and averaged over heads. It shows what the final summary token reads,
  not why a particular label scored high.
- **Attention rollout** (Abnar & Zuidema 2020): attention is mixed through the residual stream,
  so each block's head-averaged attention ``A`` is replaced by ``0.5 * A + 0.5 * I`` (the identity
  is the skip connection), rows re-normalised, and the blocks multiplied from first to last.
  The CLS row of the product says how much each input patch flows into the CLS output.
- **Grad-CAM** (Selvaraju et al. 2017) on the tokens that enter the last block (the output of
  its ``norm1``): the gradient of one label's logit, averaged over patches, weights each feature
  channel; the weighted sum over channels, clipped at zero, is the map. This is the only one of
  the three that depends on the chosen label. (The *output* tokens of the last block cannot be
  used: with ``global_pool="token"`` only the CLS token reaches the head, so their gradients are zero.)

Both attention maps follow what the head reads (``model.global_pool``): for ``avg`` (the mean of the
patch tokens) the CLS row is replaced by the mean of the patch rows, the attention into the pooled
output; with ``token`` they are the classic CLS maps. ``avgmax`` (mean and max side by side) uses the
mean's rows too: which patch wins a channel's max depends on the image, not on the attention, and
Grad-CAM, which follows the head's gradient, already shows it. ``token+avg`` (the CLS token and the patch
mean side by side) gets the average of the two rows, one for each half of what the head reads.

All maps come back at the patch grid (``[B, g, g]``); :func:`to_image` upsamples and normalises
them to the model's input size.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cxrvit.model.vit import VisionTransformer

METHODS = ("attention", "rollout", "gradcam")


def _grid(model: VisionTransformer, x: torch.Tensor) -> tuple[int, int]:
    return x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size


def _readout_row(model: VisionTransformer, attn: torch.Tensor) -> torch.Tensor:
    """``[..., 1+N, 1+N]`` attention -> ``[..., N]``: the row of what the head reads, to the patches
    (the CLS token's row; for ``global_pool="avg"``/``"avgmax"`` the mean of the patch tokens' rows; for
    ``"token+avg"`` the average of the two)."""
    cls_row, mean_rows = attn[..., 0, 1:], attn[..., 1:, 1:].mean(-2)
    if model.global_pool == "token":
        return cls_row
    return 0.5 * (cls_row + mean_rows) if model.global_pool == "token+avg" else mean_rows


@torch.no_grad()
def cls_attention(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Last-block attention of the read-out to the patches per head, ``[B, heads, g, g]`` (mean over heads:
    ``.mean(1)``): the CLS row, or the patch rows' mean for a mean-pooled head."""
    model.eval()
    attn = model.get_last_selfattention(x.float())  # [B, heads, 1+N, 1+N]
    gh, gw = _grid(model, x)
    return _readout_row(model, attn).reshape(x.shape[0], -1, gh, gw)


@torch.no_grad()
def attention_rollout(model: VisionTransformer, x: torch.Tensor, residual: bool = True) -> torch.Tensor:
    """Attention rollout with the residual identity, ``[B, g, g]``."""
    model.eval()
    maps = model.get_all_selfattentions(x.float())
    n = maps[0].shape[-1]
    eye = torch.eye(n, device=x.device)
    rollout = eye.expand(x.shape[0], n, n)
    for attn in maps:
        a = attn.mean(dim=1)
        if residual:
            a = 0.5 * a + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout  # later blocks act on what earlier blocks produced
    gh, gw = _grid(model, x)
    return _readout_row(model, rollout).reshape(x.shape[0], gh, gw)


def grad_cam(model: VisionTransformer, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Grad-CAM for head output ``target`` (one index, or one per image), ``[B, g, g]``."""
    model.eval()
    store: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        store["tokens"] = output

    handle = model.blocks[-1].norm1.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            xg = x.detach().float().requires_grad_(True)  # makes the graph exist even for frozen weights
            logits = model(xg)
            idx = torch.as_tensor(target, device=logits.device).long().expand(logits.shape[0])
            logits.gather(1, idx[:, None]).sum().backward()
    finally:
        handle.remove()
    tokens, grads = store["tokens"][:, 1:].detach(), store["tokens"].grad[:, 1:]
    weights = grads.mean(dim=1, keepdim=True)  # [B, 1, D]: one weight per feature channel
    cam = F.relu((tokens * weights).sum(dim=-1))
    model.zero_grad(set_to_none=True)
    gh, gw = _grid(model, x)
    return cam.reshape(x.shape[0], gh, gw)


def to_image(maps: torch.Tensor, size: int) -> np.ndarray:
    """``[B, g, g]`` maps -> ``[B, size, size]`` float32 in [0, 1] (bilinear, min-max per map)."""
    up = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    return ((up - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy().astype(np.float32)


def explain(model: VisionTransformer, x: torch.Tensor, target: int | Sequence[int],
            per_head: bool = False) -> dict[str, np.ndarray]:
    """All maps for a normalised batch ``x`` ``[B, 3, S, S]``, each ``[B, S, S]`` in [0, 1]."""
    size = x.shape[-1]
    heads = cls_attention(model, x)
    out = {
        "attention": to_image(heads.mean(dim=1), size),
        "rollout": to_image(attention_rollout(model, x), size),
        "gradcam": to_image(grad_cam(model, x, target), size),
    }
    if per_head:
        for h in range(heads.shape[1]):
            out[f"attention_head{h}"] = to_image(heads[:, h], size)
    return out


# -- overlays -----------------------------------------------------------------------------------

def caption_for(probs: Mapping[str, float], findings: Sequence[str], target: str, flags: Sequence[str] = (),
                top: int = 4) -> str:
    best = sorted(probs.items(), key=lambda kv: -kv[1])[:top]
    lines = [
        "findings: " + (", ".join(findings) if findings else "none over threshold"),
        "top: " + ", ".join(f"{k} {v:.2f}" for k, v in best),
        f"Grad-CAM target: {target}",
    ]
    if flags:
        lines.append("QC: " + "; ".join(flags))
    return "\n".join(lines)


def save_overlay(path: os.PathLike | str, grey: np.ndarray, maps: Mapping[str, np.ndarray], caption: str,
                 title: str = "", alpha: float = 0.45) -> Path:
    """One PNG: the image, then each map blended over it, with ``caption`` underneath.

    ``grey`` may be larger than the maps (a sharper copy of the same square picture).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; set before pyplot is imported
    import matplotlib.pyplot as plt

    panels = [("image", None)] + list(maps.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.9), squeeze=False)
    extent = (0, grey.shape[1], grey.shape[0], 0)  # maps may be smaller than the picture: stretch them over it
    for ax, (name, heat) in zip(axes[0], panels):
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255, extent=extent)
        if heat is not None:
            ax.imshow(heat, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, extent=extent, interpolation="bilinear")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.text(0.01, 0.01, caption, fontsize=8, va="bottom", ha="left", family="monospace")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.22, wspace=0.04)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
