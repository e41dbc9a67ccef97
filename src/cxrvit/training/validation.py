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
from cxrvit.runtime import autocast, inference_precision
from cxrvit.training.augment import eval_transform, resize_batch, to_float


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

    In the scoring precision (:func:`cxrvit.runtime.inference_precision`), not the training one, so the
    probabilities the thresholds are tuned on are the ones ``eval`` and ``predict`` give later.
    """
    precision = inference_precision(device)
    was_training = model.training
    model.eval()
    probs, targets, loss_sum, n = [], [], 0.0, 0
    for batch in loader:
        images = batch.images.to(device, non_blocking=True)
        views = [eval_transform(images, size)]
        if tta:
            views.append(center_zoom(to_float(images), size, 0.9))
        logits = None
        for view in views:
            with autocast(device, precision):
                out = model(prep.normalize(view)).float()
            logits = out if logits is None else logits + out
        logits = logits / len(views)
        y = batch.targets.to(device)
        loss_sum += F.binary_cross_entropy_with_logits(logits, y, reduction="sum").item() / y.shape[1]
        n += len(y)
        probs.append(torch.sigmoid(logits).cpu())
        targets.append(y.cpu())
    model.train(was_training)
    if n == 0:
        raise ValueError("validation set is empty: no rows to validate on")
    return ValResult(torch.cat(probs).numpy(), torch.cat(targets).numpy(), loss_sum / n)


def center_zoom(x: torch.Tensor, size: int, fraction: float) -> torch.Tensor:
    """The central ``fraction`` of the side, resized to ``size`` (a mild zoom-in view for TTA)."""
    side = x.shape[-1]
    crop = max(1, round(side * fraction))
    off = (side - crop) // 2
    return resize_batch(x[..., off:off + crop, off:off + crop], size)


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")
