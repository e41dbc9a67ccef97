"""Multi-label losses on logits ``[B, K]`` and 0/1 (or mixed, soft) targets ``[B, K]``.

All of them return the mean over batch and labels, so switching the loss does not silently
change the effective learning rate by a factor of K. They are computed in float32 whatever
the autocast precision: log-probabilities of rare labels are where bf16 rounding hurts.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrvit.training.config import LossConfig


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs go up to float32; float32/float64 stay as they are (gradcheck uses float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) or not t.is_floating_point() else t


class BCELoss(nn.Module):
    """Binary cross-entropy, optionally with a per-label weight on the positive term."""

    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = _f32(logits)
        pw = None if self.pos_weight is None else self.pos_weight.to(x.device, x.dtype)
        return F.binary_cross_entropy_with_logits(x, targets.to(x.dtype), pos_weight=pw)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): BCE scaled by ``(1 - p_t)**gamma`` so easy examples count less."""

    def __init__(self, gamma: float = 2.0, alpha: float = -1.0):
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = _f32(logits)
        y = targets.to(x.dtype)
        bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        p = torch.sigmoid(x)
        p_t = p * y + (1 - p) * (1 - y)
        loss = bce * (1 - p_t).pow(self.gamma)
        if self.alpha >= 0:
            loss = loss * (self.alpha * y + (1 - self.alpha) * (1 - y))
        return loss.mean()


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., ICCV 2021).

    Positives: ``-(1 - p)**gamma_pos * log(p)``. Negatives: the probability is first shifted down
    by ``clip`` (``p_m = max(p - clip, 0)``, so very easy negatives contribute exactly nothing),
    then ``-p_m**gamma_neg * log(1 - p_m)``. With 14 findings most labels of most images are
    easy negatives; this keeps them from drowning out the few positives.
    """

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05, eps: float = 1e-8):
        super().__init__()
        self.gamma_pos, self.gamma_neg, self.clip, self.eps = gamma_pos, gamma_neg, clip, eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = _f32(logits)
        y = targets.to(x.dtype)
        p = torch.sigmoid(x)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        # log(p) via logsigmoid is exact for very negative logits, where log(sigmoid) underflows.
        log_p = F.logsigmoid(x)
        log_not = torch.log((1 - p_neg).clamp(min=self.eps))
        loss_pos = y * log_p
        loss_neg = (1 - y) * log_not
        if self.gamma_pos > 0:
            loss_pos = loss_pos * (1 - p).pow(self.gamma_pos)
        if self.gamma_neg > 0:
            loss_neg = loss_neg * p_neg.pow(self.gamma_neg)
        return -(loss_pos + loss_neg).mean()


def positive_weights(targets: np.ndarray, max_weight: float = 50.0) -> torch.Tensor:
    """``neg / pos`` per label from the training targets, capped; a label with no positives gets the cap."""
    targets = np.asarray(targets, dtype=np.float64)
    pos = targets.sum(axis=0)
    neg = len(targets) - pos
    w = np.where(pos > 0, neg / np.maximum(pos, 1), max_weight)
    return torch.tensor(np.clip(w, 1.0, max_weight), dtype=torch.float32)


def build_loss(cfg: LossConfig, train_targets: np.ndarray | None = None) -> nn.Module:
    """The configured loss. ``weighted_bce`` needs the training targets for its prevalence."""
    if cfg.kind == "bce":
        return BCELoss()
    if cfg.kind == "weighted_bce":
        if train_targets is None:
            raise ValueError("loss.kind=weighted_bce needs the training targets to compute pos_weight")
        return BCELoss(positive_weights(train_targets, cfg.max_pos_weight))
    if cfg.kind == "focal":
        return FocalLoss(cfg.gamma, cfg.alpha)
    if cfg.kind == "asl":
        return AsymmetricLoss(cfg.gamma_pos, cfg.gamma_neg, cfg.clip)
    raise ValueError(f"unknown loss.kind {cfg.kind!r}; choose bce, weighted_bce, focal or asl")
