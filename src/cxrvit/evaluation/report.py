"""Markdown + PNG report of an :class:`~cxrvit.evaluation.evaluate.EvalResult`.

Plots (matplotlib, Agg backend, no display needed), one set for the scored targets:
- ``roc.png``: ROC curves with the operating point (the tuned threshold) marked;
- ``pr.png``: precision-recall curves with the operating point and the prevalence line
  (the precision of guessing at random);
- ``reliability.png``: calibration — observed rate vs mean predicted probability per bin;
- ``f1_vs_trivial.png``: per-target F1 (with its CI) next to the trivial all-positive F1.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cxrvit.evaluation import metrics as M


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def _ci(v, ci) -> str:
    if v is None or ci is None or ci[0] is None:
        return _num(v)
    return f"{_num(v)} ({_num(ci[0])}–{_num(ci[1])})"


def provenance_line(p: dict) -> str:
    if not p.get("verified"):
        why = p.get("reason") or "the bundle does not record its tuning images"
        return (f"**Thresholds: source not verifiable** — {why} "
                f"(declared split: {p.get('split', 'unknown')}). F1 may be optimistic.")
    if p.get("in_sample"):
        return (f"**In-sample thresholds: F1 is optimistic.** The thresholds were tuned on these very images "
                f"({p['overlap_images']} of them; split {p['split']!r}).")
    count = f" ({p['tuning_images']} images)" if p.get("tuning_images") is not None else ""
    return (f"Thresholds were tuned on the model's own {p['split']!r} split{count}; "
            "no scored image shares a patient with them.")


def markdown(result, title: str = "cxrvit evaluation", plots: bool = True) -> str:
    j = result.to_json()
    h = result.headline
    lines = [
        f"# {title}",
        "",
        f"- model: `{j.get('run', '?')}`  data: `{j.get('data', '?')}`  split: **{result.split}**",
        f"- {result.n_images} images of {result.n_patients} patients",
        f"- {provenance_line(result.provenance)}",
        f"- intervals: 95% percentile bootstrap over patients ({result.bootstrap['resamples']} resamples, "
        f"seed {result.bootstrap['seed']})",
        "",
        f"**Mean F1 of the scored targets: {h['mean_f1_scored'].fmt()}** "
        f"(trivial all-positive F1: {h['mean_trivial_f1_scored'].fmt()}; mean AUROC {h['mean_auroc_scored'].fmt()})",
        "",
        "| target | n | pos | prev. | thr | F1 [95% CI] | F1@0.5 | trivial F1 | AUROC [95% CI] | AP [95% CI] "
        "| sens | spec | PPV | NPV | TP | FP | FN | TN |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: |",
    ]
    for name, t in result.targets.items():
        label = f"**{name}**" if t["scored"] else name
        lines.append(
            f"| {label} | {t['n']} | {t['positives']} | {_num(t['prevalence'])} | {_num(t['threshold'])} | "
            f"{_ci(t['f1'], t['f1_ci'])} | {_num(t['f1_at_0.5'])} | {_num(t['trivial_f1'])} | "
            f"{_ci(t['auroc'], t['auroc_ci'])} | {_ci(t['ap'], t['ap_ci'])} | {_num(t['sensitivity'])} | "
            f"{_num(t['specificity'])} | {_num(t['ppv'])} | {_num(t['npv'])} | "
            f"{t['tp']} | {t['fp']} | {t['fn']} | {t['tn']} |"
        )
    lines += ["", "Scored targets in bold. Predicted positive means probability ≥ threshold. "
              "Trivial F1 = F1 of calling every image positive (2·prev/(1+prev)): an F1 at or below it is no "
              "better than not looking at the image."]
    per = result.per_image
    if per:
        lines += ["", f"Findings per image: **{per['called']:.2f} called** of {per['labels']} labels, where the images "
                      f"carry {per['carried']:.2f}; scored targets {per['scored_called']:.2f} called vs "
                      f"{per['scored_carried']:.2f} carried (Mass/Nodule counts beside Mass and Nodule)."]
    if plots:
        lines += ["", "![ROC](roc.png)", "![PR](pr.png)", "![reliability](reliability.png)",
                  "![F1 vs trivial](f1_vs_trivial.png)"]
    return "\n".join(lines) + "\n"


def _grid(plt, n: int):
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), squeeze=False)
    return fig, axes[0]


def plot_all(result, out: Path) -> list[Path]:
    plt = _plt()
    names = result.scored or result.labels[:3]
    idx = [result.labels.index(n) for n in names]
    y, p, thr = result.y_true, result.y_prob, result.thresholds
    written = []

    fig, axes = _grid(plt, len(names))
    for ax, name, k in zip(axes, names, idx):
        fpr, tpr, _ = M.roc_curve(y[:, k], p[:, k])
        c = result.targets[name]
        ax.plot(fpr, tpr, lw=1.5, label=f"AUROC {_num(c['auroc'])}")
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        if c["specificity"] is not None and c["sensitivity"] is not None:
            ax.plot(1 - c["specificity"], c["sensitivity"], "o", c="C3", label=f"threshold {c['threshold']:.3f}")
        ax.set(title=name, xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=8)
    written.append(_save(fig, out / "roc.png", plt))

    fig, axes = _grid(plt, len(names))
    for ax, name, k in zip(axes, names, idx):
        rec, prec, _ = M.pr_curve(y[:, k], p[:, k])
        c = result.targets[name]
        ax.step(np.r_[0, rec], np.r_[prec[0] if len(prec) else 1, prec], where="pre", lw=1.5,
                label=f"AP {_num(c['ap'])}")
        ax.axhline(c["prevalence"], ls=":", c="grey", label=f"prevalence {c['prevalence']:.3f}")
        if c["sensitivity"] is not None and c["ppv"] is not None:
            ax.plot(c["sensitivity"], c["ppv"], "o", c="C3", label=f"F1 {c['f1']:.3f} @ {c['threshold']:.3f}")
        ax.set(title=name, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="upper right", fontsize=8)
    written.append(_save(fig, out / "pr.png", plt))

    fig, axes = _grid(plt, len(names))
    for ax, name, k in zip(axes, names, idx):
        b = M.calibration_bins(y[:, k], p[:, k], n_bins=10)
        keep = b["count"] > 0
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.plot(b["mean_predicted"][keep], b["observed"][keep], "o-", label=f"ECE {_num(result.targets[name]['ece'])}")
        ax.set(title=name, xlabel="mean predicted probability", ylabel="observed positive rate",
               xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
    written.append(_save(fig, out / "reliability.png", plt))

    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.8))
    x = np.arange(len(names))
    f1 = np.array([result.targets[n]["f1"] for n in names])
    lo = np.array([result.targets[n]["f1_ci"][0] for n in names])
    hi = np.array([result.targets[n]["f1_ci"][1] for n in names])
    triv = np.array([result.targets[n]["trivial_f1"] for n in names])
    ax.bar(x - 0.2, f1, 0.4, yerr=[f1 - lo, hi - f1], capsize=3, label="F1 (tuned threshold)")
    ax.bar(x + 0.2, triv, 0.4, color="grey", label="trivial F1 (all positive)")
    ax.set_xticks(x, names)
    ax.set(ylabel="F1", ylim=(0, 1), title="F1 vs trivial F1")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "f1_vs_trivial.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result, directory: os.PathLike | str, title: str = "cxrvit evaluation") -> Path:
    """Write ``report.md``, ``metrics.json`` and the four PNGs into ``directory``; return report.md."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    plot_all(result, out)
    # allow_nan=False: to_json maps undefined numbers to null; a NaN past it must fail, not write bad JSON.
    (out / "metrics.json").write_text(json.dumps(result.to_json(), indent=2, allow_nan=False))
    path = out / "report.md"
    path.write_text(markdown(result, title))
    return path
