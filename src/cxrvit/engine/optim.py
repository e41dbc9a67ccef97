"""AdamW parameter groups and the one learning-rate schedule of every cxrvit training loop.

Schedule convention (one for all loops): step ``s`` (0-based, the optimizer step about to be taken)
gets ``base * (s + 1) / warmup`` during the warm-up, so the first step already learns (a step at
lr 0 would be wasted) and step ``warmup - 1`` is at ``base``; then a half cosine from ``base`` at
step ``warmup`` down to ``final`` at step ``total``. With ``warmup = 0`` it is a plain cosine, which
is how the SSL weight-decay and teacher-momentum schedules use it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from cxrvit.model.vit import VisionTransformer, layer_id_for


def warmup_cosine(step: int, total: int, warmup: int, base: float, final: float) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then a half cosine to ``final`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups of ``model``'s trainable parameters, each parameter in exactly one group.

    No weight decay on 1-d parameters (biases, norm gains) nor on the names ``model.no_weight_decay()``
    lists (a ViT: ``pos_embed``, ``cls_token``). A model without ``no_weight_decay`` (the SSL methods)
    decays every matrix, CLS token included: the rule of DINO's and MAE's reference code, kept so
    pre-training results do not move. Layer-wise lr decay (ViT only): layer ``i`` of ``L + 1`` (0 the
    embedding, 1..L the blocks, L + 1 the final norm and head) gets ``lr_scale = layer_decay**(L + 1 - i)``,
    which :func:`apply_schedule` multiplies into the scheduled lr. ``apply_wd`` marks the groups a
    weight-decay schedule applies to. Groups are ordered by (layer, no-decay), so a checkpoint's
    optimizer state maps back onto them.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if isinstance(model, VisionTransformer):
        depth = len(model.blocks)
        num_layers = depth + 1
        layer_of = lambda name: layer_id_for(name, depth)  # noqa: E731
    elif layer_decay != 1.0:
        raise ValueError(f"layer-wise lr decay needs a VisionTransformer, not {type(model).__name__}")
    else:
        num_layers, layer_of = 0, (lambda name: 0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen: an EMA teacher, fixed sin-cos positions
        layer = layer_of(name)
        no_decay = p.ndim <= 1 or name in skip
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (num_layers - layer), "apply_wd": not no_decay}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_adamw(groups: list[dict], lr: float, betas, device: torch.device, fused: bool = True):
    """AdamW over ``groups``. Fused: one pass over each parameter instead of ~10 element-wise kernels;
    the per-parameter loop took a third of an MAE step's CPU time at 128 px (docs/history/benchmarks.md,
    issue 13). Fused kernels exist for CPU and CUDA only."""
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused and device.type in ("cpu", "cuda"))


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Set this step's lr (times each group's ``lr_scale``) and, when scheduled, its weight decay.

    ``weight_decay=None`` leaves the groups' constant decay alone (supervised training; its checkpoints
    from before the engine have no ``apply_wd`` key, and need none then).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if weight_decay is not None and group["apply_wd"]:
            group["weight_decay"] = weight_decay
