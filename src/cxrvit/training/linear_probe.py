"""``strategy: linear_probe``: a frozen backbone and a logistic-regression head, cross-fitted.

Why this exists (docs/history/benchmarks.md, "Issue 10"; today's numbers: docs/results.md): on ~500-1,000 training images a ViT-S/16 trained end
to end from random init stays at chance AUROC within any budget two CPU cores allow, while an
L2-regularised logistic regression on the *frozen* CLS features of the same network beats it on every
scored target. With a pre-trained backbone (``--init``: DINO's ImageNet checkpoint, or a CXR
self-supervised run) this is DINO's own linear evaluation.

What is fitted, and on what:
  1. CLS features of every training image (train + validation rows: the thresholds no longer need a
     carve-out), in the scoring pass's fp32 preprocessing, so the head sees exactly what ``predict``
     will feed it; ``probe.views > 1`` adds augmented views of each training image. The pass is the
     cost: it is written in chunks and resumes where it was killed (``probe_features.py``).
  2. For each C in ``probe.c_grid``: out-of-fold probabilities over ``probe.cv_folds`` patient folds
     of those rows (``cross_fit_path``: folds outside, the C grid inside, warm-started). The C with the
     best mean out-of-fold AUROC of the scored targets is kept.
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
from cxrvit.engine.runlog import METRICS
from cxrvit.evaluation.metrics import auroc, tune_thresholds
from cxrvit.fileio import json_safe
from cxrvit.inference.bundle import save_bundle, tuning_source
from cxrvit.model.checkpoints import load_init_backbone
from cxrvit.model.vit import build_model
from cxrvit.runtime import resolve_device
from cxrvit.training.config import TrainConfig, config_to_dict, save_config
# head_features: also what bench/rehearsal imports from here (the feature pass moved to probe_features).
from cxrvit.training.probe_features import FEATURES, PARTIAL, head_features, probe_features  # noqa: F401


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x - mean) / std`` with a trailing column of ones (the intercept), in one float64 allocation."""
    mean, std = x.mean(0), x.std(0) + 1e-6   # +1e-6: a constant feature must not divide by zero
    z = np.empty((len(x), x.shape[1] + 1))
    np.subtract(x, mean, out=z[:, :-1])
    z[:, :-1] /= std
    z[:, -1] = 1.0
    return z, mean, std


def _gram_basis(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-pairs of ``z.T @ z``: the preconditioner of every label's Newton system, for every C.

    The Hessian of label j is ``C z.T S_j z + R`` (S_j: that label's p(1-p)); ``C mean(S_j) z.T z + I``
    is close to it and, in this basis, inverted for any C and any label at ``O(D^2)``.
    """
    lam, q = np.linalg.eigh(z.T @ z)
    return np.clip(lam, 0.0, None), q


def _newton_directions(z, s, c, ridge, grad, basis, exact, eta, max_iter):
    """Solve ``(C z.T diag(s_j) z + diag(ridge)) d_j = grad_j`` for every label j at once, by preconditioned
    conjugate gradients, until ``|residual_j| <= eta_j |grad_j|``. Returns the directions and each
    label's number of iterations.

    A Hessian-vector product costs ``4 N D`` per label where forming the Hessian costs ``N D^2`` (or
    ``2 N D^2`` as the row-scaled product the solver used before): with D = 385, dozens of products
    cost less than one Hessian. The preconditioner is ``C mean(s_j) z.T z + I`` in the ``basis`` of
    ``_gram_basis`` (free for any C and label), or, for the labels in ``exact`` (position -> matrix), the
    inverse of that label's Hessian at an earlier iterate.
    """
    lam, q = basis
    damp = c * s.mean(0)[:, None] * lam[None, :] + 1.0          # [K, D+1], > 0

    def precondition(r, on):
        out = ((r @ q) / damp[on]) @ q.T
        for i, j in enumerate(np.flatnonzero(on)):
            if j in exact:
                out[i] = exact[j] @ r[i]
        return out

    k = len(grad)
    d, r = np.zeros_like(grad), grad.copy()
    goal = eta * np.linalg.norm(grad, axis=1)
    steps = np.zeros(k, dtype=int)
    on = np.linalg.norm(r, axis=1) > goal                       # labels still iterating
    u = np.zeros_like(grad)
    u[on] = precondition(r[on], on)
    p, ru = u.copy(), (r * u).sum(1)
    for _ in range(max_iter):
        if not on.any():
            break
        hp = c * ((z @ p[on].T) * s[:, on]).T @ z + p[on] * ridge
        php = (p[on] * hp).sum(1)
        alpha = ru[on] / np.where(php > 0, php, 1.0)
        d[on] += alpha[:, None] * p[on]
        r[on] -= alpha[:, None] * hp
        steps[on] += 1
        still = (np.linalg.norm(r[on], axis=1) > goal[on]) & (php > 0)
        on[np.flatnonzero(on)[~still]] = False
        if not on.any():
            break
        u_on = precondition(r[on], on)
        ru_new = (r[on] * u_on).sum(1)
        p[on] = u_on + (ru_new / ru[on])[:, None] * p[on]
        ru[on] = ru_new
    return d, steps


def _logistic_newton(z: np.ndarray, y: np.ndarray, c: float, theta: np.ndarray | None = None,
                     basis=None, iters: int = 100) -> np.ndarray:
    """Every label's L2 logistic regression at once, by damped (truncated) Newton steps in float64.

    ``z``: ``[N, D+1]`` standardised features with the ones column (``_standardise``). Minimises
    ``C * sum_i logloss_i + |w|^2 / 2`` per label, the intercept unpenalised -- scikit-learn's
    ``LogisticRegression(C)`` objective -- until every gradient entry is below ``1e-9 max(1, C N)``.
    Returns ``theta`` ``[K, D+1]`` (weights, then the intercept). ``theta`` in: a warm start (the
    solution at the previous C of a path); a label that has converged is not stepped again.
    """
    n, d1 = z.shape
    k = y.shape[1]
    theta = np.zeros((k, d1)) if theta is None else np.array(theta, dtype=np.float64)
    basis = _gram_basis(z) if basis is None else basis
    ridge = np.ones(d1)
    ridge[-1] = 0.0                       # the intercept is not penalised
    tol = 1e-9 * max(1.0, c * n)

    def objective(logits, t, yy):
        # log(1 + e^l) - y l, stable for large |l|
        return c * (np.logaddexp(0.0, logits) - yy * logits).sum(0) + 0.5 * (t[:, :-1] ** 2).sum(1)

    logits = z @ theta.T
    value = objective(logits, theta, y)
    live = np.arange(k)
    inverse, refresh = {}, set()          # label -> inverse Hessian at an earlier iterate; labels to (re)form
    for _ in range(iters):
        p = _sigmoid(logits[:, live])
        grad = c * (p - y[:, live]).T @ z + theta[live] * ridge
        gmax = np.abs(grad).max(1)
        keep = gmax >= tol
        if not keep.any():
            break
        live, p, grad, gmax = live[keep], p[:, keep], grad[keep], gmax[keep]
        s = p * (1 - p)
        for i in np.flatnonzero(np.isin(live, list(refresh))):
            root = z * np.sqrt(s[:, i])[:, None]
            inverse[live[i]] = np.linalg.inv(c * (root.T @ root) + np.diag(ridge + 1e-12))   # root.T @ root: syrk
        # Forcing term sqrt(|g|): loose steps far from the optimum, Newton's own near it.
        eta = np.minimum(0.1, np.sqrt(gmax / max(1.0, c * n)))
        exact = {i: inverse[g] for i, g in enumerate(live) if g in inverse}
        step, cg_steps = _newton_directions(z, s, c, ridge, grad, basis, exact, eta, max_iter=2 * d1)
        # One Hessian costs about D/4 conjugate-gradient steps: a label that needed more than ~D/16 gets
        # its own (at the next iterate) as preconditioner, after which it needs a handful.
        refresh = set(live[cg_steps > d1 // 16].tolist())
        yy, scale = y[:, live], np.ones(len(live))
        for _ in range(30):               # backtracking, per label: never accept a step that goes uphill
            trial = theta[live] - scale[:, None] * step
            trial_logits = z @ trial.T
            new = objective(trial_logits, trial, yy)
            worse = new > value[live] + 1e-12 * np.abs(value[live])
            if not worse.any():
                break
            scale[worse] *= 0.5
        theta[live], logits[:, live], value[live] = trial, trial_logits, new
    return theta


def _fit_standardised(z, mean, std, y, c, theta=None, basis=None):
    """``fit_head`` on features already standardised by ``_standardise``; also returns the solution in
    standardised coordinates (the warm start of the next C on the same rows)."""
    k, d = y.shape[1], z.shape[1] - 1
    w_z, bias, solved = np.zeros((k, d)), np.zeros(k), np.zeros((k, d + 1))
    prior = y.mean(0)
    both = (prior > 0) & (prior < 1)
    if both.any():
        start = None if theta is None else theta[both]
        solved[both] = _logistic_newton(z, y[:, both], c, start, basis)
        w_z[both], bias[both] = solved[both, :-1], solved[both, -1]
    eps = 0.5 / (len(y) + 1)              # one class only: +-log((n + 0.5) / 0.5)
    p = np.clip(prior[~both], eps, 1 - eps)
    bias[~both] = np.log(p / (1 - p))
    w = w_z / std
    return w, bias - w @ mean, solved


def fit_head(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-label logistic regressions on standardised features, folded back to raw features:
    ``logits = x @ W.T + b`` with ``W`` ``[K, D]`` -- a drop-in ``nn.Linear`` head. A label with one
    class in ``y`` gets a zero weight and a finite log-odds bias (the optimum would be infinite)."""
    z, mean, std = _standardise(x)
    w, b, _ = _fit_standardised(z, mean, std, y, c)
    return w, b


def cross_fit_path(feats: np.ndarray, view_rows: np.ndarray, y_views: np.ndarray, rows: np.ndarray,
                   plain: np.ndarray, y: np.ndarray, patient_ids, cs, k: int, seed: int) -> list[np.ndarray]:
    """Out-of-fold probabilities ``[len(rows), K]`` for each C in ``cs``: each patient fold is predicted
    (plain view) by a head fitted on the other folds (all their views).

    Folds outside, C inside: each fold's rows are standardised and their Gram matrix decomposed once for
    the whole grid, and each C starts from the fold's solution at the next smaller C (a warm start along
    the path). The optimum of each fit is unique, so the order changes only the route to it."""
    oof = [np.zeros((len(rows), y.shape[1])) for _ in cs]
    position = {r: i for i, r in enumerate(rows)}
    order = np.argsort(cs, kind="stable")
    for fit_rows, held in splits.patient_kfold(rows, patient_ids, k=k, seed=seed):
        take = np.isin(view_rows, fit_rows)
        z, mean, std = _standardise(feats[take])
        basis, theta = _gram_basis(z), None
        idx = np.array([position[r] for r in held])
        for i in order:
            w, b, theta = _fit_standardised(z, mean, std, y_views[take], cs[i], theta, basis)
            oof[i][idx] = _sigmoid(plain[idx] @ w.T + b)
        del z
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
    if not resume and any((out / f).exists() for f in (FEATURES, PARTIAL, "bundle.json")):
        raise FileExistsError(f"{out} already holds a linear probe ({FEATURES}, {PARTIAL} or bundle.json); pass "
                              f"resume=True (--resume) to reuse its features, or choose a new output folder")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.engine.seed)
    model = build_model(cfg.model.arch, num_classes=len(labels), attention=cfg.model.attention,
                        pos_embed=cfg.model.pos_embed, global_pool=cfg.model.global_pool,
                        n_last_blocks=cfg.model.n_last_blocks)
    init_report = load_init_backbone(init, model) if init is not None else None   # refuses a file with no backbone
    model.to(dev)
    prep = Preprocessing(size=cfg.model.img_size, source_size=cache.size)

    # Resumable: a killed pass continues from its last chunk in RUN/features.partial (probe_features.py).
    feats = probe_features(out, model, cache, rows, cfg, init, prep, dev, resume, progress)
    n = len(rows)
    plain = feats[:n]                                  # view 0 is always the scoring view
    view_rows = np.tile(rows, p.views)
    y = cache.labels(labels).astype(np.float64)
    y_rows, y_views = y[rows], y[view_rows]

    scored_idx = [labels.index(s) for s in scored] or list(range(len(labels)))
    k = min(p.cv_folds, len(np.unique(np.asarray(cache.patient_ids)[rows])))
    search, best = [], None
    oofs = cross_fit_path(feats, view_rows, y_views, rows, plain, y_rows, cache.patient_ids, p.c_grid, k,
                          cfg.data.split_seed)
    for c, oof in zip(p.c_grid, oofs):
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
    with open(out / METRICS, "w") as fh:
        for record in search:
            fh.write(json.dumps(record) + "\n")
    save_bundle(out, model.cpu(), labels, dict(zip(labels, thresholds.tolist())), prep, arch=cfg.model.arch,
                threshold_source=tuning_source("cross-fitted", cache.index["image"].to_numpy()[rows],
                                                 cache.patient_ids[rows], folds=k),
                config=config_to_dict(cfg),
                extra={"training": {"strategy": "linear_probe", "C": c, "oof_mean_auroc_scored": json_safe(float(score)),
                                    "c_search": search, "images": n, "views": p.views,
                                    "init": str(init) if init else None,
                                    "init_report": str(init_report) if init_report else None,
                                    "seconds": round(time.time() - start, 1), "weights": "model",
                                    "precision": "fp32"}})  # features come from a scoring pass
    return out
