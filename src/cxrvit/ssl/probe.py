"""Label-free training, labelled *monitoring*: k-NN and linear-probe AUROC on frozen features.

The encoder is frozen; features of the probe's training rows fit the probe, features of its
validation rows score it. Both row sets must come from the data the pre-training is allowed to
see the labels of (the benchmark passes the training folds' split, never the scored fold).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from cxrvit.data.preprocess import Preprocessing, eval_transform
from cxrvit.labels import SCORED_TARGETS
from cxrvit.model.vit import VisionTransformer
from cxrvit.ssl.encoder import encode


@dataclass
class ProbeSet:
    """A labelled cache and the rows the probe trains on / is scored on."""
    cache: object                    # CXRCache (or anything with .pixels and .labels(names))
    train_rows: np.ndarray
    val_rows: np.ndarray
    labels: tuple[str, ...] = SCORED_TARGETS


@torch.no_grad()
def extract_features(vit: VisionTransformer, pixels, rows: np.ndarray, size: int, pre: Preprocessing,
                     batch_size: int = 64, device: torch.device | str = "cpu",
                     bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(CLS, mean of patch tokens) features ``[N, D]`` each, after the final norm."""
    was_training = vit.training
    vit.eval()
    cls_out, mean_out = [], []
    for start in range(0, len(rows), batch_size):
        idx = np.sort(rows[start:start + batch_size])
        order = np.argsort(np.argsort(rows[start:start + batch_size]))  # back to the caller's order
        grey = torch.from_numpy(np.ascontiguousarray(pixels[idx])).unsqueeze(1)[order].to(device)
        x = pre.normalize(eval_transform(grey, size))
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            tokens = encode(vit, x).float()
        cls_out.append(tokens[:, 0].cpu())
        mean_out.append(tokens[:, 1:].mean(1).cpu())
    vit.train(was_training)
    return torch.cat(cls_out).numpy(), torch.cat(mean_out).numpy()


def _auroc(y: np.ndarray, scores: np.ndarray) -> float:
    # A label absent (or always present) in the probe's validation rows has no AUROC.
    return float(roc_auc_score(y, scores)) if 0 < y.sum() < len(y) else float("nan")


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, k: int = 20,
               temperature: float = 0.07) -> np.ndarray:
    """DINO's weighted k-NN on cosine similarity, per label: sum of exp(sim/T) * label over neighbours."""
    tx = F.normalize(torch.from_numpy(train_x).float(), dim=1)
    vx = F.normalize(torch.from_numpy(val_x).float(), dim=1)
    sim, idx = (vx @ tx.T).topk(min(k, len(tx)), dim=1)
    w = (sim / temperature).exp()
    ty = torch.from_numpy(train_y).float()[idx]                       # [V, k, L]
    return ((w.unsqueeze(-1) * ty).sum(1) / w.sum(1, keepdim=True)).numpy()


def linear_scores(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, c: float = 0.1) -> np.ndarray:
    """One L2-regularised logistic regression per label on standardised features."""
    scaler = StandardScaler().fit(train_x)
    tx, vx = scaler.transform(train_x), scaler.transform(val_x)
    out = np.full((len(val_x), train_y.shape[1]), 0.5, dtype=np.float64)
    for j in range(train_y.shape[1]):
        if 0 < train_y[:, j].sum() < len(train_y):
            clf = LogisticRegression(C=c, max_iter=2000).fit(tx, train_y[:, j])
            out[:, j] = clf.predict_proba(vx)[:, 1]
    return out


def run_probes(vit: VisionTransformer, probe: ProbeSet, size: int, pre: Preprocessing, k: int = 20,
               device: torch.device | str = "cpu", batch_size: int = 64, bf16: bool = False) -> dict[str, float]:
    """k-NN and linear AUROC per label and their means, for CLS and mean-pooled features."""
    names = list(probe.labels)
    y = probe.cache.labels(names)
    ty, vy = y[probe.train_rows], y[probe.val_rows]
    tr = extract_features(vit, probe.cache.pixels, probe.train_rows, size, pre, batch_size, device, bf16)
    va = extract_features(vit, probe.cache.pixels, probe.val_rows, size, pre, batch_size, device, bf16)
    out: dict[str, float] = {}
    for feat_name, tx, vx in (("cls", tr[0], va[0]), ("mean", tr[1], va[1])):
        for probe_name, scores in (("knn", knn_scores(tx, ty, vx, k)), ("linear", linear_scores(tx, ty, vx))):
            aucs = [_auroc(vy[:, j], scores[:, j]) for j in range(len(names))]
            for name, a in zip(names, aucs):
                out[f"{probe_name}_{feat_name}/{name}"] = a
            out[f"{probe_name}_{feat_name}_auroc"] = float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan")
    return out
