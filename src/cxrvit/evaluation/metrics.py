"""Per-label metrics for multi-label classification, written out in numpy.

Conventions used everywhere in cxrvit:
- ``y_true`` is ``[N, K]`` 0/1, ``y_prob`` is ``[N, K]`` scores (probabilities), one column per label.
- An image is predicted positive for a label when ``y_prob >= threshold`` (greater *or equal*).
- Metrics that are undefined for a label return NaN (AUROC and AP when the label has only one class
  in the data), never a made-up number; F1 with nothing predicted and nothing positive is 0, as in
  scikit-learn's ``zero_division=0``.

Every function here accepts optional per-image ``weights`` (``[N]`` or ``[B, N]``): the patient
bootstrap (:mod:`cxrvit.evaluation.bootstrap`) draws patients with replacement and expresses a
resample as "image i counts w_i times", so one implementation serves both the point estimate
(weights all 1) and all resamples at once (a ``[B, N]`` weight matrix, no Python loop over B).
"""
from __future__ import annotations

import numpy as np

#: Threshold used for a label whose tuning data has no positive (or no negative) image: with one
#: class there is no precision/recall trade-off to optimise, so we fall back to the uncommitted
#: probability 0.5 rather than inventing an extreme value that would silently predict all/none.
DEGENERATE_THRESHOLD = 0.5


def _as_2d(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise ValueError(f"{name} must be [N, K] (or [N]); got shape {y.shape}")
    return y


def _check(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    y_true = _as_2d(y_true, "y_true").astype(bool)
    y_prob = _as_2d(y_prob, "y_prob").astype(np.float64)
    if y_true.shape != y_prob.shape:
        raise ValueError(f"y_true {y_true.shape} and y_prob {y_prob.shape} differ in shape")
    if not np.all(np.isfinite(y_prob)):
        raise ValueError("y_prob contains NaN or infinite scores")
    return y_true, y_prob


def _weights(weights, n: int) -> np.ndarray:
    """Return weights as ``[B, N]`` float64 (B = 1 for the plain, unweighted estimate)."""
    if weights is None:
        return np.ones((1, n))
    w = np.asarray(weights, dtype=np.float64)
    w = w[None, :] if w.ndim == 1 else w
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"weights must be [N] or [B, N] with N={n}; got shape {np.shape(weights)}")
    return w


def _squeeze(out: np.ndarray, weights) -> np.ndarray:
    """Drop the resample axis again when the caller passed no weights or 1-D weights."""
    return out[0] if weights is None or np.ndim(weights) == 1 else out


def _thresholds(thr, shape: tuple[int, int]) -> np.ndarray:
    """Scalar, ``[K]`` (one per label) or ``[N, K]`` (one per image and label, as when pooling
    cross-validation folds that each bring their own thresholds)."""
    thr = np.asarray(thr, dtype=np.float64)
    try:
        return np.broadcast_to(thr, shape)
    except ValueError:
        raise ValueError(f"thresholds of shape {thr.shape} do not fit predictions of shape {shape}") from None


# --------------------------------------------------------------------------- confusion & F1


def confusion(y_true, y_prob, thr, weights=None) -> dict[str, np.ndarray]:
    """Confusion counts per label at ``thr`` (scalar, ``[K]`` or ``[N, K]``): ``tp, fp, tn, fn``, each ``[K]``
    (or ``[B, K]`` with ``[B, N]`` weights). Counts are weighted sums, so they may be non-integer
    only if the weights are."""
    y_true, y_prob = _check(y_true, y_prob)
    w = _weights(weights, len(y_true))
    pred = y_prob >= _thresholds(thr, y_prob.shape)
    pos, neg = y_true.astype(np.float64), (~y_true).astype(np.float64)
    predf = pred.astype(np.float64)
    out = {
        "tp": w @ (pos * predf),
        "fp": w @ (neg * predf),
        "fn": w @ (pos * (1 - predf)),
        "tn": w @ (neg * (1 - predf)),
    }
    return {k: _squeeze(v, weights) for k, v in out.items()}


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), empty)


def f1_from_counts(tp, fp, fn) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN); 0 when nothing is positive and nothing predicted (sklearn's
    ``zero_division=0``)."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    return _ratio(2 * tp, 2 * tp + fp + fn, 0.0)


def f1_at(y_true, y_prob, thr, weights=None) -> np.ndarray:
    """F1 per label when predicting ``y_prob >= thr`` (``thr`` scalar or ``[K]``)."""
    c = confusion(y_true, y_prob, thr, weights)
    return f1_from_counts(c["tp"], c["fp"], c["fn"])


def rates_from_counts(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV, NPV from confusion counts; NaN where the denominator is 0
    (e.g. PPV when nothing is predicted positive) because there is then nothing to report."""
    nan = float("nan")
    return {
        "sensitivity": _ratio(c["tp"], c["tp"] + c["fn"], nan),
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"], nan),
        "ppv": _ratio(c["tp"], c["tp"] + c["fp"], nan),
        "npv": _ratio(c["tn"], c["tn"] + c["fn"], nan),
    }


def trivial_f1(y_true, weights=None) -> np.ndarray:
    """F1 of the trivial classifier that calls every image positive: TP = P, FP = N - P, FN = 0,
    so F1 = 2P / (N + P). A model whose F1 does not beat this has learned nothing usable at its
    operating point, however good its AUROC looks."""
    y_true = _as_2d(y_true, "y_true").astype(np.float64)
    w = _weights(weights, len(y_true))
    p = w @ y_true
    n = w.sum(axis=1, keepdims=True)
    return _squeeze(_ratio(2 * p, n + p, 0.0), weights)


# --------------------------------------------------------------------------- threshold tuning


def best_f1_threshold(y_true_col, y_prob_col) -> tuple[float, float]:
    """Max-F1 threshold for one label -> ``(threshold, f1 at it)``.

    Candidates are the distinct scores: predicting ``>= s`` for each distinct ``s`` enumerates every
    distinct prediction set. The returned threshold is the **midpoint** between the lowest score
    predicted positive and the next lower distinct score (the highest predicted negative), so the
    operating point sits in the gap rather than on a training score, and small score changes on new
    data do not flip it. When the best choice is to call every image positive there is no lower
    score, and the threshold is the lowest score itself. Ties in F1 go to the *higher* threshold
    (fewer positive calls). A label with no positives or no negatives gets
    :data:`DEGENERATE_THRESHOLD`.
    """
    y = np.asarray(y_true_col).astype(bool).ravel()
    s = np.asarray(y_prob_col, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        pred = s >= DEGENERATE_THRESHOLD
        tp = float((pred & y).sum())
        return DEGENERATE_THRESHOLD, float(f1_from_counts(tp, (pred & ~y).sum(), (~pred & y).sum()))
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # Last index of each run of equal scores: predicting ">= s" includes the whole run.
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = np.cumsum(y_sorted)[ends].astype(np.float64)
    fp = (ends + 1) - tp
    f1 = 2 * tp / (n_pos + tp + fp)  # 2TP / (2TP + FP + FN) with FN = P - TP
    i = int(np.argmax(f1))  # first maximum = highest threshold among ties
    lo = s_sorted[ends[i]]
    if i + 1 == len(ends):
        return float(lo), float(f1[i])
    hi_negative = s_sorted[ends[i + 1]]
    thr = 0.5 * (lo + hi_negative)
    # Scores one ulp apart have no float between them: the midpoint rounds onto the negative
    # score, which would flip it to positive; the positive score itself is then the threshold.
    if thr <= hi_negative:
        thr = lo
    return float(thr), float(f1[i])


def tune_thresholds(y_true, y_prob) -> np.ndarray:
    """Max-F1 threshold per label (see :func:`best_f1_threshold`) -> ``[K]`` float64.

    Call this only on validation data: thresholds fitted on the images being scored inflate F1.
    """
    y_true, y_prob = _check(y_true, y_prob)
    return np.array([best_f1_threshold(y_true[:, k], y_prob[:, k])[0] for k in range(y_true.shape[1])])


# --------------------------------------------------------------------------- ranking metrics


def _tie_groups(scores_col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort order (descending score) and the group id of each sorted item (equal scores share one)."""
    order = np.argsort(-scores_col, kind="stable")
    s = scores_col[order]
    group = np.r_[0, np.cumsum(s[1:] != s[:-1])]
    return order, group


def _group_sums(w_sorted: np.ndarray, mask_sorted: np.ndarray, group: np.ndarray) -> np.ndarray:
    """``[B, G]``: per resample, the weight of the masked items in each tie group. Groups are
    contiguous runs in sorted order, so one ``reduceat`` sums them all."""
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    return np.add.reduceat(w_sorted * mask_sorted, starts, axis=1)


def _ranking_stats(y_col: np.ndarray, s_col: np.ndarray, w: np.ndarray):
    """Weighted positives/negatives per tie group, groups in descending score order."""
    if len(s_col) == 0:
        raise ValueError("cannot rank an empty set of predictions")
    order, group = _tie_groups(s_col)
    ws, ys = w[:, order], y_col[order].astype(np.float64)
    return _group_sums(ws, ys, group), _group_sums(ws, 1.0 - ys, group)


def auroc(y_true, y_prob, weights=None) -> np.ndarray:
    """Area under the ROC curve per label (ties count one half; the Mann-Whitney statistic, equal
    to scikit-learn's ``roc_auc_score``). NaN for a label with only one class."""
    y_true, y_prob = _check(y_true, y_prob)
    w = _weights(weights, len(y_true))
    out = np.full((w.shape[0], y_true.shape[1]), np.nan)
    for k in range(y_true.shape[1]):
        pos_g, neg_g = _ranking_stats(y_true[:, k], y_prob[:, k], w)
        p, n = pos_g.sum(axis=1), neg_g.sum(axis=1)
        # Groups run from the highest score down: negatives strictly below a group are the total
        # minus those at or above it.
        neg_below = n[:, None] - np.cumsum(neg_g, axis=1)
        num = (pos_g * (neg_below + 0.5 * neg_g)).sum(axis=1)
        out[:, k] = _ratio(num, p * n, np.nan)
    return _squeeze(out, weights)


def average_precision(y_true, y_prob, weights=None) -> np.ndarray:
    """Average precision per label, scikit-learn's definition: ``sum_n (R_n - R_{n-1}) P_n`` over
    the distinct score thresholds (no interpolation). NaN for a label with only one class."""
    y_true, y_prob = _check(y_true, y_prob)
    w = _weights(weights, len(y_true))
    out = np.full((w.shape[0], y_true.shape[1]), np.nan)
    for k in range(y_true.shape[1]):
        pos_g, neg_g = _ranking_stats(y_true[:, k], y_prob[:, k], w)
        p, n = pos_g.sum(axis=1), neg_g.sum(axis=1)
        tp, fp = np.cumsum(pos_g, axis=1), np.cumsum(neg_g, axis=1)
        precision = _ratio(tp, tp + fp, 0.0)
        ap = _ratio((pos_g * precision).sum(axis=1), p, np.nan)
        out[:, k] = np.where((p > 0) & (n > 0), ap, np.nan)
    return _squeeze(out, weights)


def _curve_counts(y_true_col, y_prob_col) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Walk the distinct scores downwards: ``(y, tp, predicted_positive, score)`` at each distinct score."""
    y = np.asarray(y_true_col).astype(bool).ravel()
    s = np.asarray(y_prob_col, dtype=np.float64).ravel()
    order, group = _tie_groups(s)
    ends = np.flatnonzero(np.r_[group[1:] != group[:-1], True])
    return y, np.cumsum(y[order])[ends], ends + 1, s[order][ends]


def roc_curve(y_true_col, y_prob_col) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` for one label, starting at (0, 0), one point per distinct score."""
    y, tp, predicted, score = _curve_counts(y_true_col, y_prob_col)
    fp = predicted - tp
    p, n = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / n], np.r_[0.0, tp / p], np.r_[np.inf, score]


def pr_curve(y_true_col, y_prob_col) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(recall, precision, thresholds)`` for one label, one point per distinct score (descending)."""
    y, tp, predicted, score = _curve_counts(y_true_col, y_prob_col)
    return tp / max(int(y.sum()), 1), tp / predicted, score


def calibration_bins(y_true_col, y_prob_col, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Reliability-diagram data: equal-width probability bins -> mean predicted, observed rate, count."""
    y = np.asarray(y_true_col, dtype=np.float64).ravel()
    s = np.asarray(y_prob_col, dtype=np.float64).ravel()
    idx = np.clip((s * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    mean_pred = _ratio(np.bincount(idx, s, n_bins), count, np.nan)
    observed = _ratio(np.bincount(idx, y, n_bins), count, np.nan)
    return {"mean_predicted": mean_pred, "observed": observed, "count": count}


def expected_calibration_error(y_true_col, y_prob_col, n_bins: int = 10) -> float:
    """Count-weighted mean |observed - predicted| over equal-width bins."""
    b = calibration_bins(y_true_col, y_prob_col, n_bins)
    keep = b["count"] > 0
    if not keep.any():
        return float("nan")
    gap = np.abs(b["observed"][keep] - b["mean_predicted"][keep])
    return float((gap * b["count"][keep]).sum() / b["count"][keep].sum())
