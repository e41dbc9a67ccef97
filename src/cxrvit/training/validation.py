"""Validation pass and the per-epoch metrics the engine logs and selects on."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrvit.data.preprocess import Preprocessing
from cxrvit.evaluation.metrics import auroc, f1_at, tune_thresholds
from cxrvit.inference import scoring


@dataclass
class ValResult:
    probs: np.ndarray            # [N, K]
    targets: np.ndarray          # [N, K]
    loss: float                  # mean BCE (the same yardstick whatever the training loss)

    def metrics(self, labels: list[str], scored: list[str]) -> dict:
        au = auroc(self.targets, self.probs)
        thr = tune_thresholds(self.targets, self.probs)
        f1 = f1_at(self.targets, self.probs, thr)
        idx = {name: i for i, name in enumerate(labels)}
        scored_au = [au[idx[s]] for s in scored]
        return {
            "val_loss": self.loss,
            "auroc": {name: float(au[i]) for i, name in enumerate(labels)},
            "f1": {s: float(f1[idx[s]]) for s in scored},
            "threshold": {s: float(thr[idx[s]]) for s in scored},
            "mean_auroc": _nanmean(au),
            "mean_auroc_scored": _nanmean(scored_au),
            "mean_f1_scored": _nanmean([f1[idx[s]] for s in scored]),
        }


def selection_score(metrics: dict, select: str) -> float:
    """Higher is better. Falls back to -val_loss when AUROC is undefined (one-class validation)."""
    if select == "neg_val_loss":
        return -metrics["val_loss"]
    score = metrics[select]
    return score if math.isfinite(score) else -metrics["val_loss"]


@torch.no_grad()
def predict(model: nn.Module, loader, prep: Preprocessing, size: int, device: torch.device,
            tta: bool = False) -> ValResult:
    """Probabilities for every batch of ``loader`` (in loader order) with the model in eval mode.

    Through :func:`cxrvit.inference.scoring.score_logits`, the pass ``eval``, ``predict`` and ``serve`` run,
    so the probabilities the thresholds are tuned on are the ones users get later (in the scoring
    precision, fp32, not the training one).
    """
    was_training = model.training
    model.eval()
    probs, targets, loss_sum, n = [], [], 0.0, 0
    for batch in loader:
        logits = scoring.score_logits(model, batch.images.to(device, non_blocking=True), prep, size, tta)
        y = batch.targets.to(device)
        loss_sum += F.binary_cross_entropy_with_logits(logits, y, reduction="sum").item() / y.shape[1]
        n += len(y)
        probs.append(torch.sigmoid(logits).cpu())
        targets.append(y.cpu())
    model.train(was_training)
    if n == 0:
        raise ValueError("validation set is empty: no rows to validate on")
    return ValResult(torch.cat(probs).numpy(), torch.cat(targets).numpy(), loss_sum / n)


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")
