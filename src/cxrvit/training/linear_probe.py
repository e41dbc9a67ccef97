"""``strategy: linear_probe``: a frozen backbone and a logistic-regression head, cross-fitted.

Why this exists (docs/history/benchmarks.md, "Issue 10"; today's numbers: docs/results.md): on ~500-1,000 training images a ViT-S/16 trained end
to end from random init stays at chance AUROC within any budget two CPU cores allow, while an
L2-regularised logistic regression on the *frozen* CLS features of the same network beats it on every
scored target. With a pre-trained backbone (``--init``: DINO's ImageNet checkpoint, or a CXR
self-supervised run) this is DINO's own linear evaluation.

What is fitted, and on what:
  1. CLS features of every training image (train + validation rows: the thresholds no longer need a
     carve-out), in the scoring pass's fp32 preprocessing, so the head sees exactly what ``predict``
     will feed it; ``probe.views > 1`` adds augmented views of each training image.
  2. For each C in ``probe.c_grid``: out-of-fold probabilities over ``probe.cv_folds`` patient folds
     of those rows. The C with the best mean out-of-fold AUROC of the scored targets is kept.
  3. Thresholds: max-F1 on those out-of-fold probabilities -- every training patient is a tuning
     patient, never a patient the model was fitted on (cross-fitting).
  4. The head: one logistic regression per label on all rows, the standardisation folded into the
     ``head`` Linear layer, so the bundle is an ordinary DINO-layout ViT-S/16 state_dict.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from cxrvit.data import splits
from cxrvit.data.preprocess import Preprocessing
from cxrvit.evaluation.metrics import auroc, tune_thresholds
from cxrvit.fileio import json_safe
from cxrvit.inference.bundle import save_bundle
from cxrvit.model.vit import VisionTransformer, build_model
from cxrvit.runtime import resolve_device
from cxrvit.training.augment import BatchAugment, eval_transform
from cxrvit.training.config import TrainConfig, config_to_dict, save_config
from cxrvit.training.runlog import METRICS

FEATURES = "features.npz"   # resume: extraction is most of the cost, fitting takes seconds


@torch.no_grad()
def cls_features(model: VisionTransformer, cache, rows: np.ndarray, size: int, prep: Preprocessing,
                 augment: BatchAugment | None = None, batch_size: int = 64, device: torch.device | str = "cpu",
                 progress=None) -> np.ndarray:
    """``[len(rows), D]`` final-norm CLS features in fp32 -- the ``forward_head(pre_logits=True)`` input.

    Without ``augment`` this is the scoring pass's view (whole image resized to ``size``), so a head fitted
    on these features sees at ``predict`` time exactly what it was fitted on.
    """
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = np.asarray(rows[start:start + batch_size])
        grey = torch.from_numpy(np.ascontiguousarray(cache.pixels[chunk]))[:, None].to(device)
        x = augment(grey)[0] if augment is not None else eval_transform(grey, size)
        out.append(model.forward_head(model.forward_features(prep.normalize(x)), pre_logits=True).float().cpu())
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out).numpy().astype(np.float64)


def _logistic_newton(z: np.ndarray, y: np.ndarray, c: float, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Every label's L2 logistic regression at once, by damped Newton steps in float64.

    Minimises ``C * sum_i logloss_i + |w|^2 / 2`` per label, the intercept unpenalised -- scikit-learn's
    ``LogisticRegression(C)`` objective, solved to machine precision. The Hessian is ``D + 1`` square, so
    a step costs ``N (D + 1)^2`` per label: seconds where lbfgs needed minutes on thousands of views.
    """
    n, d = z.shape
    x = np.concatenate([z, np.ones((n, 1))], 1)
    theta = np.zeros((y.shape[1], d + 1))
    ridge = np.ones(d + 1)
    ridge[-1] = 0.0                       # the intercept is not penalised

    def objective(t):
        logits = x @ t.T
        # log(1 + e^l) - y l, stable for large |l|
        loss = np.logaddexp(0.0, logits) - y * logits
        return c * loss.sum(0) + 0.5 * (t[:, :-1] ** 2).sum(1)

    value = objective(theta)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x @ theta.T)))                       # [N, K]
        grad = c * (p - y).T @ x + theta * ridge                       # [K, D+1]
        if np.abs(grad).max() < 1e-9 * max(1.0, c * n):
            break
        step = np.empty_like(theta)
        for j in range(y.shape[1]):
            hess = c * (x * (p[:, j] * (1 - p[:, j]))[:, None]).T @ x + np.diag(ridge + 1e-12)
            step[j] = np.linalg.solve(hess, grad[j])
        scale = np.ones(y.shape[1])
        for _ in range(30):               # backtracking, per label: never accept a step that goes uphill
            trial = theta - scale[:, None] * step
            new = objective(trial)
            worse = new > value + 1e-12 * np.abs(value)
            if not worse.any():
                break
            scale[worse] *= 0.5
        theta, value = trial, new
    return theta[:, :-1], theta[:, -1]


def fit_head(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-label logistic regressions on standardised features, folded back to raw features:
    ``logits = x @ W.T + b`` with ``W`` ``[K, D]`` -- a drop-in ``nn.Linear`` head. A label with one
    class in ``y`` gets a zero weight and a finite log-odds bias (the optimum would be infinite)."""
    mean, std = x.mean(0), x.std(0) + 1e-6   # +1e-6: a constant feature must not divide by zero
    z = (x - mean) / std
    k = y.shape[1]
    w_z, bias = np.zeros((k, x.shape[1])), np.zeros(k)
    prior = y.mean(0)
    both = (prior > 0) & (prior < 1)
    if both.any():
        w_z[both], bias[both] = _logistic_newton(z, y[:, both], c)
    eps = 0.5 / (len(y) + 1)              # one class only: +-log((n + 0.5) / 0.5)
    p = np.clip(prior[~both], eps, 1 - eps)
    bias[~both] = np.log(p / (1 - p))
    w = w_z / std
    return w, bias - w @ mean


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def cross_fit(feats: np.ndarray, view_rows: np.ndarray, y_views: np.ndarray, rows: np.ndarray, plain: np.ndarray,
              y: np.ndarray, patient_ids, c: float, k: int, seed: int) -> np.ndarray:
    """Out-of-fold probabilities ``[len(rows), K]``: each patient fold is predicted (plain view) by a head
    fitted on the other folds (all their views)."""
    oof = np.zeros((len(rows), y.shape[1]))
    position = {r: i for i, r in enumerate(rows)}
    for fit_rows, held in splits.patient_kfold(rows, patient_ids, k=k, seed=seed):
        take = np.isin(view_rows, fit_rows)
        w, b = fit_head(feats[take], y_views[take], c)
        idx = np.array([position[r] for r in held])
        oof[idx] = _sigmoid(plain[idx] @ w.T + b)
    return oof


def fit_linear_probe(cfg: TrainConfig, cache, train_rows, val_rows, out_dir, init=None, device=None,
                     resume: bool = False, progress: bool = True) -> Path:
    """The ``engine.train`` contract for ``strategy: linear_probe``: write a model bundle to ``out_dir``."""
    start = time.time()
    out = Path(out_dir)
    rows = np.sort(np.concatenate([np.asarray(train_rows), np.asarray(val_rows)]).astype(np.int64))
    if len(rows) == 0:
        raise ValueError("linear probe: no training rows")
    labels, scored, p = list(cfg.data.labels), cfg.scored_labels, cfg.probe
    dev = resolve_device(device or cfg.engine.device)
    if not resume and any((out / f).exists() for f in (FEATURES, "bundle.json")):
        raise FileExistsError(f"{out} already holds a linear probe ({FEATURES} or bundle.json); pass resume=True "
                              f"(--resume) to reuse its features, or choose a new output folder")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.engine.seed)
    model = build_model(cfg.model.arch, num_classes=len(labels), attention=cfg.model.attention,
                        pos_embed=cfg.model.pos_embed)
    init_report = None
    if init is not None:
        from cxrvit.model.checkpoints import load_backbone
        _, init_report = load_backbone(init, model)
    model.to(dev)
    prep = Preprocessing(size=cfg.model.img_size)

    feats_path = out / FEATURES
    feats = _load_features(feats_path, rows, p.views, _fingerprint(cfg, init)) if resume else None
    if feats is None:
        feats = _extract(model, cache, rows, cfg, prep, dev, progress)
        np.savez(feats_path, rows=rows, feats=feats, views=p.views, fingerprint=_fingerprint(cfg, init))
    n = len(rows)
    plain = feats[:n]                                  # view 0 is always the scoring view
    view_rows = np.tile(rows, p.views)
    y = cache.labels(labels).astype(np.float64)
    y_rows, y_views = y[rows], y[view_rows]

    scored_idx = [labels.index(s) for s in scored] or list(range(len(labels)))
    k = min(p.cv_folds, len(np.unique(np.asarray(cache.patient_ids)[rows])))
    search, best = [], None
    for c in p.c_grid:
        oof = cross_fit(feats, view_rows, y_views, rows, plain, y_rows, cache.patient_ids, c, k, cfg.data.split_seed)
        au = auroc(y_rows, oof)
        score = float(np.nanmean(au[scored_idx])) if not np.all(np.isnan(au[scored_idx])) else float("nan")
        search.append({"kind": "val", "C": c, "score": json_safe(float(score)),
                       "auroc": {name: json_safe(float(au[i])) for i, name in enumerate(labels)}})
        if progress:
            print(f"linear probe: C={c:g}  out-of-fold mean AUROC (scored) {score:.3f}")
        if best is None or (np.isfinite(score) and (not np.isfinite(best[1]) or score > best[1])):
            best = (c, score, oof)
    c, score, oof = best
    thresholds = tune_thresholds(y_rows, oof)
    w, b = fit_head(feats, y_views, c)
    with torch.no_grad():
        model.head.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        model.head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    names = [str(s) for s in cache.index["image"].to_numpy()[rows]]
    with open(out / METRICS, "w") as fh:
        for record in search:
            fh.write(json.dumps(record) + "\n")
    save_bundle(out, model.cpu(), labels, dict(zip(labels, thresholds.tolist())), prep, arch=cfg.model.arch,
                threshold_source={"split": "cross-fitted", "folds": k, "images": names},
                config=config_to_dict(cfg),
                extra={"training": {"strategy": "linear_probe", "C": c, "oof_mean_auroc_scored": json_safe(float(score)),
                                    "c_search": search, "images": n, "views": p.views,
                                    "init": str(init) if init else None,
                                    "init_report": str(init_report) if init_report else None,
                                    "seconds": round(time.time() - start, 1), "weights": "model",
                                    "precision": "fp32"}})  # features come from a scoring pass
    return out


def _extract(model, cache, rows, cfg: TrainConfig, prep, dev, progress: bool) -> np.ndarray:
    total = len(rows) * cfg.probe.views
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="img", desc="features", dynamic_ncols=True)
    step = bar.update if bar is not None else None
    parts = [cls_features(model, cache, rows, cfg.model.img_size, prep, device=dev, progress=step)]
    augment = BatchAugment(cfg.augment, cfg.model.img_size, seed=cfg.engine.seed + 1)
    for _ in range(cfg.probe.views - 1):
        parts.append(cls_features(model, cache, rows, cfg.model.img_size, prep, augment, device=dev, progress=step))
    if bar is not None:
        bar.close()
    return np.concatenate(parts)


def _fingerprint(cfg: TrainConfig, init) -> str:
    # What the features depend on; the head's settings (C grid, folds) are free to change on resume.
    key = [cfg.model.arch, cfg.model.img_size, cfg.engine.seed, config_to_dict(cfg)["augment"],
           str(Path(init).resolve()) if init else None]
    if cfg.model.pos_embed != "random":   # appended only when set, so features cached before the key still match
        key.append(cfg.model.pos_embed)
    return json.dumps(key)


def _load_features(path: Path, rows: np.ndarray, views: int, fingerprint: str) -> np.ndarray | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if (np.array_equal(z["rows"], rows) and int(z["views"]) == views
                and str(z["fingerprint"]) == fingerprint):
            return z["feats"]
    return None
