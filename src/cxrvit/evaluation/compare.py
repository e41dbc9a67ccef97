"""``cxrvit compare``: is model B better than model A on the same images? A paired answer.

Both models are scored on exactly the same rows, and every bootstrap resample draws the same
patients for both, so the interval is for the *difference* (B − A): noise from which patients
happen to be in the test set is shared and cancels, which is what makes a small difference
detectable at all. Each model keeps its own validation-tuned thresholds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from cxrvit.data.cache import CXRCache
from cxrvit.evaluation import metrics as M
from cxrvit.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, Estimate, PatientBootstrap, estimates, verdict
from cxrvit.evaluation.evaluate import (bundle_thresholds, cache_targets, check_thresholds_held_out, predict_rows,
                                        read_bundle_meta, select_rows)
from cxrvit.fileio import json_safe
from cxrvit.inference.bundle import load_bundle
from cxrvit.labels import SCORED_TARGETS
from cxrvit.runtime import resolve_device


@dataclass
class Comparison:
    names: tuple[str, str]                 # (A, B); differences are B − A
    targets: list[str]
    f1: dict[str, tuple[float, float]]     # per target: (A, B)
    auroc: dict[str, tuple[float, float]]
    trivial_f1: dict[str, float]
    diff_f1: dict[str, Estimate]           # per target and "mean"
    diff_auroc: dict[str, Estimate]        # per target and "mean"
    n_images: int
    n_patients: int
    bootstrap: dict

    @property
    def verdict(self) -> str:
        a, b = self.names
        return verdict("mean F1", self.diff_f1["mean"], a=b, b=a)

    @property
    def verdict_auroc(self) -> str:
        a, b = self.names
        return verdict("mean AUROC", self.diff_auroc["mean"], a=b, b=a)

    def to_json(self) -> dict:
        a, b = self.names
        # json_safe: an AUROC is NaN where a target has no positive among the images; JSON has no NaN.
        return json_safe({
            "a": a, "b": b, "difference": "b - a", "n_images": self.n_images, "n_patients": self.n_patients,
            "bootstrap": self.bootstrap, "verdict": self.verdict, "verdict_auroc": self.verdict_auroc,
            "targets": {
                t: {"f1_a": self.f1[t][0], "f1_b": self.f1[t][1], "auroc_a": self.auroc[t][0],
                    "auroc_b": self.auroc[t][1], "trivial_f1": self.trivial_f1[t],
                    "diff_f1": self.diff_f1[t].to_dict(), "diff_auroc": self.diff_auroc[t].to_dict()}
                for t in self.targets
            },
            "mean": {"diff_f1": self.diff_f1["mean"].to_dict(), "diff_auroc": self.diff_auroc["mean"].to_dict()},
        })

    def markdown(self) -> str:
        a, b = self.names
        lines = [
            f"| target | F1 {a} | F1 {b} | trivial F1 | ΔF1 ({b} − {a}) [95% CI] | AUROC {a} | AUROC {b} | ΔAUROC [95% CI] |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for t in self.targets:
            lines.append(f"| {t} | {self.f1[t][0]:.3f} | {self.f1[t][1]:.3f} | {self.trivial_f1[t]:.3f} | "
                         f"{self.diff_f1[t].fmt(signed=True)} | {_f(self.auroc[t][0])} | {_f(self.auroc[t][1])} | "
                         f"{self.diff_auroc[t].fmt(signed=True)} |")
        mean = lambda d, i: np.nanmean([d[t][i] for t in self.targets])
        triv = np.mean([self.trivial_f1[t] for t in self.targets])
        lines.append(f"| **mean** | **{mean(self.f1, 0):.3f}** | **{mean(self.f1, 1):.3f}** | {triv:.3f} | "
                     f"**{self.diff_f1['mean'].fmt(signed=True)}** | {_f(mean(self.auroc, 0))} | "
                     f"{_f(mean(self.auroc, 1))} | {self.diff_auroc['mean'].fmt(signed=True)} |")
        lines += ["", self.verdict + ".", self.verdict_auroc + ".",
                  f"({self.n_images} images of {self.n_patients} patients; paired patient bootstrap, "
                  f"{self.bootstrap['resamples']} resamples, seed {self.bootstrap['seed']})"]
        return "\n".join(lines)


def _f(x: float) -> str:
    return "n/a" if x is None or np.isnan(x) else f"{x:.3f}"


def _nanmean_last(a: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN (a resample where a target has one class); NaN, without
    a warning, when every entry is NaN."""
    ok = np.isfinite(a)
    total = np.where(ok, a, 0.0).sum(-1, keepdims=True)
    count = ok.sum(-1, keepdims=True)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _scored_columns(y_true, labels: list[str], targets=None):
    """The targets to compare (default: the scored ones among ``labels``), their columns, and ``y`` cut to them."""
    targets = list(targets or [t for t in SCORED_TARGETS if t in labels])
    if not targets:
        raise ValueError(f"none of the targets to compare ({', '.join(SCORED_TARGETS)}) is among the labels {labels}")
    idx = [labels.index(t) for t in targets]
    return targets, idx, np.asarray(y_true, dtype=np.float64)[:, idx]


def _paired_estimates(stat, targets, patient_ids, n_resamples, seed, groups=None):
    """Point value and patient-bootstrap CI of a paired statistic: ``stat(weights)`` gives per-target "f1" and
    "auroc" differences and their "f1_mean"/"auroc_mean"; returns (ΔF1, ΔAUROC), per target and "mean", and the
    bootstrap's description. ``groups``: the seed of each row, resampled too (:class:`PatientBootstrap`)."""
    point = stat(None)
    bootstrap = PatientBootstrap(patient_ids, n_resamples, seed, groups=groups)
    boot = bootstrap.run(stat)
    out = []
    for key in ("f1", "auroc"):
        d = dict(zip(targets, estimates(point[key], boot[key])))
        d["mean"] = estimates(point[key + "_mean"], boot[key + "_mean"])[0]
        out.append(d)
    return (*out, {"unit": bootstrap.unit, "paired": True, "resamples": n_resamples, "seed": seed})


def paired_compare(y_true, prob_a, thr_a, prob_b, thr_b, patient_ids, labels, *, names=("A", "B"),
                   targets=None, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                   groups=None) -> Comparison:
    """Paired patient bootstrap of B − A on fixed predictions of both models.

    ``prob_*`` are ``[N, K]`` over ``labels``; ``thr_*`` are ``[K]`` or ``[N, K]`` (pooled CV folds).
    ``targets`` defaults to the scored targets present in ``labels``. ``groups``: the training seed of each
    row when several seeds' predictions are stacked, resampled with the patients (crossed bootstrap).
    """
    labels = list(labels)
    targets, idx, y = _scored_columns(y_true, labels, targets)
    pa, pb = np.asarray(prob_a, dtype=np.float64)[:, idx], np.asarray(prob_b, dtype=np.float64)[:, idx]
    if pa.shape != pb.shape or len(pa) != len(y):
        raise ValueError(f"both models must be scored on the same images: got {len(pa)} and {len(pb)} rows "
                         f"for {len(y)} ground-truth rows")
    ta = np.broadcast_to(np.asarray(thr_a, dtype=np.float64), np.shape(prob_a))[:, idx]
    tb = np.broadcast_to(np.asarray(thr_b, dtype=np.float64), np.shape(prob_b))[:, idx]

    def stat(w):
        f1a, f1b = M.f1_at(y, pa, ta, w), M.f1_at(y, pb, tb, w)
        aua, aub = M.auroc(y, pa, w), M.auroc(y, pb, w)
        df, da = f1b - f1a, aub - aua
        return {"f1": df, "auroc": da, "f1_mean": df.mean(-1, keepdims=True), "auroc_mean": _nanmean_last(da)}

    d_f1, d_au, bootstrap = _paired_estimates(stat, targets, patient_ids, n_resamples, seed, groups)
    f1a, f1b = M.f1_at(y, pa, ta), M.f1_at(y, pb, tb)
    aua, aub = M.auroc(y, pa), M.auroc(y, pb)
    triv = M.trivial_f1(y)
    return Comparison(
        names=tuple(names), targets=targets,
        f1={t: (float(f1a[i]), float(f1b[i])) for i, t in enumerate(targets)},
        auroc={t: (float(aua[i]), float(aub[i])) for i, t in enumerate(targets)},
        trivial_f1={t: float(triv[i]) for i, t in enumerate(targets)},
        diff_f1=d_f1, diff_auroc=d_au, n_images=len(y),
        n_patients=len(np.unique(np.asarray(patient_ids).astype(str))),
        bootstrap=bootstrap,
    )


@dataclass
class GainContrast:
    """How much more curve B gains than curve A between two training-set sizes, on the same images:
    ``(B_hi − B_lo) − (A_hi − A_lo)``, per target and ``"mean"``, with a paired patient-bootstrap CI."""
    curves: tuple[str, str]                # (A, B), each named by its largest-share arm
    shares: tuple[str, str]                # (lo, hi), e.g. ("0.25", "1")
    gain_auroc: dict[str, tuple[float, float]]   # mean AUROC gain of (A, B)
    gain_f1: dict[str, tuple[float, float]]
    diff_auroc: dict[str, Estimate]
    diff_f1: dict[str, Estimate]
    n_images: int
    bootstrap: dict

    def to_json(self) -> dict:
        # json_safe: a gain in AUROC is NaN where a target has no positive among the images.
        return json_safe({"a": self.curves[0], "b": self.curves[1], "shares": list(self.shares),
                "difference": "(b_hi - b_lo) - (a_hi - a_lo)", "n_images": self.n_images, "bootstrap": self.bootstrap,
                "gain_auroc": {t: list(v) for t, v in self.gain_auroc.items()},
                "gain_f1": {t: list(v) for t, v in self.gain_f1.items()},
                "diff_auroc": {t: e.to_dict() for t, e in self.diff_auroc.items()},
                "diff_f1": {t: e.to_dict() for t, e in self.diff_f1.items()}})


def gain_contrast(y_true, a_lo, a_hi, b_lo, b_hi, patient_ids, labels, *, curves=("A", "B"), shares=("lo", "hi"),
                  n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, groups=None) -> GainContrast:
    """Paired patient bootstrap of the difference between two data-scaling gains.

    Each of ``a_lo, a_hi, b_lo, b_hi`` is ``(prob [N, K], thr [K] or [N, K])`` on the same ``N`` images;
    every resample draws the same patients for all four, so the interval is for the difference of the
    gains itself, not for two gains read off side by side (whose separate CIs overlap far more).
    """
    targets, idx, y = _scored_columns(y_true, list(labels))
    preds = []
    for prob, thr in (a_lo, a_hi, b_lo, b_hi):
        p = np.asarray(prob, dtype=np.float64)
        if len(p) != len(y):
            raise ValueError(f"all four arms must be scored on the same images: got {len(p)} rows for {len(y)}")
        preds.append((p[:, idx], np.broadcast_to(np.asarray(thr, dtype=np.float64), p.shape)[:, idx]))
    signs = np.array([1.0, -1.0, -1.0, 1.0])   # (b_hi - b_lo) - (a_hi - a_lo)

    def stat(w):
        f1 = np.stack([M.f1_at(y, p, t, w) for p, t in preds])
        au = np.stack([M.auroc(y, p, w) for p, t in preds])
        df, da = np.tensordot(signs, f1, axes=1), np.tensordot(signs, au, axes=1)
        return {"f1": df, "auroc": da, "f1_mean": df.mean(-1, keepdims=True), "auroc_mean": _nanmean_last(da)}

    d_f1, d_au, bootstrap = _paired_estimates(stat, targets, patient_ids, n_resamples, seed, groups)
    f1 = [M.f1_at(y, p, t) for p, t in preds]
    au = [M.auroc(y, p) for p, t in preds]
    gain = lambda s, lo, hi: {**{t: float(s[hi][i] - s[lo][i]) for i, t in enumerate(targets)},
                              "mean": float(np.nanmean(s[hi]) - np.nanmean(s[lo]))}
    ga, gb = gain(au, 0, 1), gain(au, 2, 3)
    fa, fb = gain(f1, 0, 1), gain(f1, 2, 3)
    return GainContrast(curves=tuple(curves), shares=tuple(shares),
                        gain_auroc={k: (ga[k], gb[k]) for k in ga}, gain_f1={k: (fa[k], fb[k]) for k in fa},
                        diff_auroc=d_au, diff_f1=d_f1, n_images=len(y), bootstrap=bootstrap)


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike, data: str | os.PathLike, split: str = "test", *,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, device=None, batch_size: int = 64,
                 allow_unverified_thresholds: bool = False, progress: bool = False, cache=None) -> Comparison:
    """Predict both bundles on the same ``split`` rows of ``data`` and compare them (B − A)."""
    if split == "val":
        raise ValueError("compare scores held-out images only: two models tuned on different validation sets have no "
                         "common 'val' split; use --split test or --split all on a held-out cache")
    cache = cache if cache is not None else CXRCache(data)
    rows = select_rows(cache, split, data=str(data))
    # Both guards first (bundle.json only), so a leaky model fails before any weights are loaded.
    for run in (run_a, run_b):
        check_thresholds_held_out(read_bundle_meta(run).get("threshold_source") or {}, cache, rows,
                                  allow_in_sample=False, allow_unverified=allow_unverified_thresholds, run=str(run))
    dev = resolve_device(device)
    bundles, probs, thrs = [], [], []
    for run in (run_a, run_b):
        bundle = load_bundle(run, device=dev)
        bundles.append(bundle)
        probs.append(predict_rows(bundle, cache, rows, batch_size=batch_size, progress=progress))
        thrs.append(bundle_thresholds(bundle, str(run)))
    # Compare on the labels both heads share, in A's order.
    labels = [name for name in bundles[0].labels if name in bundles[1].labels]
    ia = [bundles[0].labels.index(n) for n in labels]
    ib = [bundles[1].labels.index(n) for n in labels]
    y = cache_targets(cache, labels, str(data))[rows]
    names = tuple(os.path.basename(os.path.normpath(r)) for r in (run_a, run_b))
    if names[0] == names[1]:
        names = (str(run_a), str(run_b))
    return paired_compare(y, probs[0][:, ia], thrs[0][ia], probs[1][:, ib], thrs[1][ib],
                          np.asarray(cache.patient_ids)[rows], labels, names=names,
                          n_resamples=n_resamples, seed=seed)
