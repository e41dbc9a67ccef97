"""Scoring for ``cxrvit bench arms``: pool folds, stack seeds, one table with paired CIs.

Kept apart from the runner (``arms.py``) so the table can be rebuilt from the saved held-out
predictions alone, without a model or a training engine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrvit.evaluation import metrics as M
from cxrvit.evaluation.bootstrap import DEFAULT_RESAMPLES
from cxrvit.evaluation.compare import Comparison, GainContrast, gain_contrast, paired_compare
from cxrvit.evaluation.evaluate import EvalResult, score_predictions
from cxrvit.experiments.crossval import FoldPredictions, pool
from cxrvit.experiments.plan import arm_dir, pretrain_dirs, scaling_key
from cxrvit.fileio import json_safe
from cxrvit.labels import SCORED_TARGETS
from cxrvit.engine.runlog import METRICS, read_metrics

PROBE_KEYS = ("knn_cls_auroc", "knn_mean_auroc", "linear_cls_auroc", "linear_mean_auroc")


@dataclass
class ArmsResult:
    arms: list[str]
    reference: str
    scores: dict[str, EvalResult]
    comparisons: dict[str, Comparison]          # arm -> (arm − reference)
    cost_minutes: dict[str, dict[str, float]]   # arm -> {"train": min, "pretrain": min}
    learning: dict[str, dict]                   # arm -> best/last epoch and late slope of validation AUROC
    info: dict = field(default_factory=dict)
    probes: dict[str, dict] = field(default_factory=dict)   # pre-training -> probe key -> [first, last]
    # data scaling: curve name -> [(arm, train_fraction)] by fraction, and (smallest -> largest) comparisons
    scaling: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    scaling_gain: dict[str, Comparison] = field(default_factory=dict)
    # each curve's gain minus the reference arm's curve's gain over the same shares (paired on the patients)
    scaling_contrast: dict[str, GainContrast] = field(default_factory=dict)
    # arms whose seeds gave identical predictions (a probe on a fixed backbone): their stacked rows are one run
    identical_seeds: list[str] = field(default_factory=list)
    # each fold and seed alone: arm -> "f<fold>s<seed>" -> {"mean_auroc", "mean_f1"} (point estimates)
    cells: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def markdown(self) -> str:
        i = self.info
        ref = self.reference
        if i["protocol"] != "cv":
            what = "NIH official split (train_val -> train/val, test_list -> test)"
        elif len(i["scored_folds"]) == i["folds"]:
            what = f"{i['folds']}-fold patient-wise cross-validation, pooled out-of-fold predictions"
        else:
            what = (f"a patient-wise hold-out: fold(s) {i['scored_folds']} of a {i['folds']}-fold plan scored, "
                    "each by models trained (and pre-trained) on the other folds only")
        targets = [t for t in SCORED_TARGETS if t in self.scores[ref].targets]
        lines = [
            f"### Arms on {what}; seeds {i['seeds']} stacked",
            "",
            f"- data: `{i['data']}` ({self.scores[ref].n_images} scored predictions = images × seeds, "
            f"{self.scores[ref].n_patients} patients, cache {i['cache_size']} px); common overrides: "
            f"`{' '.join(i['overrides']) or 'none'}`",
            f"- scored on: {i['machine']}; commit `{i['commit']}`",
            f"- command: `{i['command']}`",
            *self.trained_by_lines(),
            "",
            f"| arm | mean F1 [95% CI] | Δ mean F1 vs {ref} [paired 95% CI] | mean AUROC [95% CI] | "
            f"Δ mean AUROC [paired 95% CI] | "
            + " | ".join(f"F1 / AUROC {t}" for t in targets)
            + " | val AUROC best@epoch (last) | cost min (pretrain + train) |",
            "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in targets) + " | ---: | ---: |",
        ]
        for arm in self.arms:
            s = self.scores[arm]
            h = s.headline
            c = self.comparisons.get(arm)
            d_f1 = c.diff_f1["mean"].fmt(signed=True) if c else "—"
            d_au = c.diff_auroc["mean"].fmt(signed=True) if c else "—"
            per = " | ".join(f"{s.targets[t]['f1']:.3f} / {_f(s.targets[t]['auroc'])}" for t in targets)
            lr = self.learning.get(arm, {})
            if "probe_oof" in lr:
                learn = f"probe OOF {lr['probe_oof']:.3f} (C {'/'.join(f'{c:g}' for c in lr['C'])})"
            else:
                learn = f"{lr['best']:.3f}@{lr['best_epoch']} ({lr['last']:.3f})" if lr else "n/a"
            cost = self.cost_minutes[arm]
            lines.append(f"| {arm} | {h['mean_f1_scored'].fmt()} | {d_f1} | {h['mean_auroc_scored'].fmt()} | {d_au} | "
                         f"{per} | {learn} | {cost['pretrain']:.0f} + {cost['train']:.0f} |")
        triv = self.scores[ref].headline["mean_trivial_f1_scored"].value
        lines += ["", f"Trivial all-positive mean F1: {triv:.3f} ("
                  + ", ".join(f"{t} {self.scores[ref].targets[t]['trivial_f1']:.3f}" for t in targets) + "). "
                  "F1 at each fold's own thresholds (validation-tuned when fine-tuned, cross-fitted over the "
                  f"fold's training images for linear probes); CIs are {_interval_words(self.scores[ref].bootstrap)}; "
                  f"Δ = arm − {ref}, paired on the same patients. Validation AUROC: mean over folds/seeds of the scored-target mean per epoch; for a "
                  "probe, its best out-of-fold mean AUROC over the C grid and the C chosen per fold/seed."]
        if self.identical_seeds:
            lines += ["", f"Seeds that changed nothing: {', '.join(self.identical_seeds)} gave identical predictions for "
                          f"every seed (nothing random is left, e.g. a probe on a fixed pre-trained backbone), so "
                          f"their rows are one run stacked {len(self.info['seeds'])} times."]
        if len(next(iter(self.cells.values()), {})) > 1:
            lines += ["", self.cells_markdown()]
        if self.scaling:
            lines += ["", self.scaling_markdown()]
        if self.probes:
            lines += ["", "Frozen-feature probes of each pre-training stage inside its fold's training patients "
                          "(mean AUROC of the scored targets; k-NN cosine / logistic regression; CLS token | mean "
                          "of patch tokens), random init -> end of pre-training, mean over folds:", "",
                      "| pre-training | k-NN CLS | k-NN mean-pool | linear CLS | linear mean-pool |",
                      "| --- | --- | --- | --- | --- |"]
            for name, p in self.probes.items():
                start = f" (starts where {p['continues']} ended)" if p.get("continues") else ""
                cells = " | ".join(f"{_f(p[k][0])} -> {_f(p[k][1])}" for k in PROBE_KEYS)
                lines.append(f"| {name}{start} | {cells} |")
        return "\n".join(lines) + "\n"

    def trained_by_lines(self) -> list[str]:
        """Who trained each arm's fold models (from its prediction files), grouped: one line per origin."""
        groups: dict[str, list[str]] = {}
        for arm in self.arms:
            for origin in self.info.get("trained_by", {}).get(arm, []):
                groups.setdefault(origin or "not recorded (predictions saved before cxrvit kept it)", []).append(arm)
        return [f"- trained: {', '.join(arms)}: {origin}" for origin, arms in groups.items()]

    def cells_markdown(self) -> str:
        """Each fold and seed scored alone: where a pooled difference comes from (one fold? one pre-training?)."""
        ref, keys = self.reference, list(self.cells[self.reference])
        cv = self.info.get("protocol") == "cv"     # the official split has one test set: its cells are seeds
        heads = [f"fold {k[1:].replace('s', ' seed ')}" if cv else f"seed {k.split('s')[1]}" for k in keys]
        lines = [f"Each {'fold and ' if cv else ''}seed alone (point estimates, no CIs; a cell is "
                 f"{'one fold' if cv else 'the test set'}'s held-out patients): mean AUROC / mean F1 of `{ref}`, "
                 f"and each arm's difference from it on the same {'fold and ' if cv else ''}seed:", "",
                 "| arm | " + " | ".join(heads) + " |",
                 "| --- | " + " | ".join("---:" for _ in keys) + " |"]
        for arm in self.arms:
            if arm == ref:
                row = [f"{_f(c['mean_auroc'])} / {_f(c['mean_f1'])}" for c in self.cells[ref].values()]
            else:
                row = [" / ".join(_f(self.cells[arm][k][m] - self.cells[ref][k][m], signed=True)
                                  for m in ("mean_auroc", "mean_f1")) for k in keys]
            lines.append(f"| {arm} | " + " | ".join(row) + " |")
        return "\n".join(lines)

    def scaling_markdown(self) -> str:
        """One row per arm of each data-scaling curve (arms alike but for ``train_fraction``), and each
        curve's gain from its smallest to its largest share, paired on the same held-out patients."""
        lines = ["Data scaling: the same held-out patients, each arm trained on a nested share of every fold's "
                 "training patients (images = mean per fold, validation carve-out included); a curve marked (labels) "
                 "keeps its pre-training on one share and varies only the share of patients whose labels it reads:",
                 "",
                 "| curve | share | train images | mean AUROC [95% CI] | mean F1 [95% CI] |",
                 "| --- | ---: | ---: | ---: | ---: |"]
        for curve, members in self.scaling.items():
            for arm, frac in members:
                h = self.scores[arm].headline
                lines.append(f"| {curve} | {frac:g} | {self.info.get('train_images', {}).get(arm, float('nan')):.0f} | "
                             f"{h['mean_auroc_scored'].fmt()} | {h['mean_f1_scored'].fmt()} |")
        lines += ["", "| curve | gain from the smallest to the largest share | Δ mean AUROC [paired 95% CI] | "
                      "Δ mean F1 [paired 95% CI] |", "| --- | --- | ---: | ---: |"]
        for curve, c in self.scaling_gain.items():
            lo, hi = self.scaling[curve][0], self.scaling[curve][-1]
            lines.append(f"| {curve} | {lo[1]:g} -> {hi[1]:g} | {c.diff_auroc['mean'].fmt(signed=True)} | "
                         f"{c.diff_f1['mean'].fmt(signed=True)} |")
        if self.scaling_contrast:
            base = next(iter(self.scaling_contrast.values())).curves[0]
            lines += ["", f"Does a curve gain more than `{base}`'s? Its gain minus that gain, over the same shares, "
                          "paired on the same patients (every resample draws the same patients for all four arms):",
                      "", f"| curve | shares | gain in mean AUROC ({base} / curve) | Δ gain in mean AUROC [paired 95% CI] | "
                          f"gain in mean F1 ({base} / curve) | Δ gain in mean F1 [paired 95% CI] |",
                      "| --- | --- | ---: | ---: | ---: | ---: |"]
            for curve, c in self.scaling_contrast.items():
                ga, gf = c.gain_auroc["mean"], c.gain_f1["mean"]
                lines.append(f"| {curve} | {c.shares[0]} -> {c.shares[1]} | {ga[0]:+.3f} / {ga[1]:+.3f} | "
                             f"{c.diff_auroc['mean'].fmt(signed=True)} | {gf[0]:+.3f} / {gf[1]:+.3f} | "
                             f"{c.diff_f1['mean'].fmt(signed=True)} |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        # json_safe: a fold or seed without a positive of a target has a NaN AUROC; JSON has no NaN.
        return json_safe({"info": self.info, "reference": self.reference, "arms": self.arms,
                "scores": {a: s.to_json() for a, s in self.scores.items()},
                "vs_reference": {a: c.to_json() for a, c in self.comparisons.items()},
                "cost_minutes": self.cost_minutes, "learning": self.learning, "pretrain_probes": self.probes,
                "scaling": self.scaling, "scaling_gain": {k: c.to_json() for k, c in self.scaling_gain.items()},
                "scaling_contrast": {k: c.to_json() for k, c in self.scaling_contrast.items()},
                "identical_seeds": self.identical_seeds, "per_fold_seed": self.cells})


def fold_seed_cells(y_all: np.ndarray, results: dict[str, dict[int, list[FoldPredictions]]], labels: list[str],
                    fold_indices) -> dict[str, dict[str, dict[str, float]]]:
    """Mean AUROC and mean F1 (at the fold's own thresholds) of the scored targets, each fold and seed alone."""
    si = [labels.index(t) for t in SCORED_TARGETS if t in labels]
    cells: dict[str, dict[str, dict[str, float]]] = {}
    for arm, per_seed in results.items():
        for i, f in enumerate(fold_indices):            # per_seed[seed] holds the folds in fold_indices' order
            for seed in sorted(per_seed):
                rows, probs, thr = pool([per_seed[seed][i]], labels)
                y = y_all[rows]
                cells.setdefault(arm, {})[f"f{f}s{seed}"] = {
                    "mean_auroc": float(np.mean(M.auroc(y, probs)[si])),
                    "mean_f1": float(np.mean(M.f1_at(y, probs, thr)[si]))}
    return cells


def _interval_words(bootstrap: dict) -> str:
    n = bootstrap["resamples"]
    if bootstrap.get("unit") == "patient x seed":
        return (f"percentiles of a bootstrap that resamples patients and, crossed with them, seeds ({n} resamples): "
                "they count how much another seed's model moves the score, not only which patients were drawn")
    return f"patient-bootstrap percentiles ({n} resamples; seeds, if several, held fixed)"


def _f(x, signed: bool = False) -> str:
    """A score to 3 decimals ("n/a" when undefined, e.g. AUROC of a fold without a positive)."""
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:+.3f}" if signed else f"{x:.3f}"


def stack_seeds(per_seed: dict[int, list[FoldPredictions]], labels: list[str]):
    """Pool each seed's folds, then stack seeds in seed order: rows, probs, thresholds."""
    pooled = [pool(per_seed[s], labels) for s in sorted(per_seed)]
    return (np.concatenate([p[0] for p in pooled]), np.concatenate([p[1] for p in pooled]),
            np.concatenate([p[2] for p in pooled]))


def learning_summary(run_dirs: list[Path]) -> dict:
    """Fine-tuning: the mean-over-runs validation score per epoch, where it peaked and where it ended.
    Linear probe: the mean best out-of-fold score of its C search, and the C each run chose."""
    curves, probes = [], []
    for d in run_dirs:
        path = d / "run" / METRICS
        if not path.is_file():
            continue
        val = [r for r in read_metrics(path) if r.get("kind") == "val" and r.get("score") is not None]
        epochs = [float(r["score"]) for r in val if "C" not in r]
        grid = [r for r in val if "C" in r]
        if epochs:
            curves.append(epochs)
        elif grid:
            probes.append(max(grid, key=lambda r: float(r["score"])))
    if not curves:
        if not probes:
            return {}
        return {"probe_oof": float(np.mean([float(r["score"]) for r in probes])), "C": [r["C"] for r in probes]}
    n = min(len(c) for c in curves)
    mean = np.mean([c[:n] for c in curves], axis=0)
    best = int(np.argmax(mean))
    return {"epochs": n, "best": float(mean[best]), "best_epoch": best + 1, "last": float(mean[-1]),
            "curve": [round(float(v), 4) for v in mean]}


def stage_chain(plan, name: str | None) -> list[str]:
    """Stage ``name`` and every stage it continues (``init_from``): what an arm reading it paid for."""
    chain = []
    while name is not None:
        chain.append(name)
        name = plan.pretrain[name].init_from
    return chain


def pretrain_probes(out: Path, plan, fold_indices) -> dict[str, dict]:
    """Each pre-training stage's first and last probe (saved in its ``cost.json``), mean over folds (and
    seeds, for a ``per_seed`` stage)."""
    found = {}
    for name in plan.pretrain:
        pairs = []
        for folder in pretrain_dirs(out, plan, name, fold_indices):
            cost = folder / "cost.json"
            probes = json.loads(cost.read_text()).get("probes") if cost.is_file() else None
            if probes:
                pairs.append(probes)
        if pairs:
            found[name] = {k: [_mean([(p[i] or {}).get(k) for p in pairs]) for i in (0, 1)] for k in PROBE_KEYS}
            if plan.pretrain[name].init_from:      # its first probe is not a random init's
                found[name]["continues"] = plan.pretrain[name].init_from
    return found


def _mean(values) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def score_arms(plan, cache, results: dict[str, dict[int, list[FoldPredictions]]], fold_indices, out: Path, info: dict,
               n_resamples: int | None = None, resample_seeds: bool = True) -> ArmsResult:
    """Score every arm on the stacked predictions; ``resample_seeds`` False gives the patient-only bootstrap of
    tables scored before 6 December (seeds treated as fixed)."""
    n_resamples = n_resamples or DEFAULT_RESAMPLES
    names = [a.name for a in plan.arms]
    first = results[names[0]][plan.seeds[0]][0]
    labels = [n for n in first.labels
              if all(n in fp.labels for a in names for s in plan.seeds for fp in results[a][s])]
    stacked = {a: stack_seeds({s: results[a][s] for s in plan.seeds}, labels) for a in names}
    rows = stacked[plan.reference][0]
    for a in names:
        if not np.array_equal(stacked[a][0], rows):
            raise ValueError(f"arm {a} was scored on different images than {plan.reference}")
    y_all = cache.labels(labels).astype(np.float64)
    y = y_all[rows]
    pids = np.asarray(cache.patient_ids)[rows]
    # The seed of each stacked row (stack_seeds stacks whole seeds in seed order): with several seeds every
    # bootstrap resample draws seeds as well as patients, so the CIs count seed-to-seed variation too.
    if len(rows) % len(plan.seeds):
        raise ValueError(f"{len(rows)} stacked rows do not split into {len(plan.seeds)} seeds of the same images")
    groups = np.repeat(np.asarray(plan.seeds), len(rows) // len(plan.seeds)) if resample_seeds else None
    provenance = {"split": "validation carve-out of each fold's training patients", "verified": True,
                  "in_sample": False, "tuning_images": None, "overlap_images": 0}
    split = ("official test" if info["protocol"] != "cv" else "pooled out-of-fold"
             if len(fold_indices) == info["folds"] else "patient-wise hold-out")
    scores = {a: score_predictions(y, stacked[a][1], stacked[a][2], pids, labels, provenance=provenance, split=split,
                                   n_resamples=n_resamples, info={"arm": a}, groups=groups)
              for a in names}
    ref = stacked[plan.reference]
    comparisons = {a: paired_compare(y, ref[1], ref[2], stacked[a][1], stacked[a][2], pids, labels,
                                     names=(plan.reference, a), n_resamples=n_resamples, groups=groups)
                   for a in names if a != plan.reference}
    pre = info.get("pretrain_seconds", {})
    cost, learning = {}, {}
    for arm in plan.arms:
        train_s = sum(fp.seconds for s in plan.seeds for fp in results[arm.name][s])
        pretrain_s = sum(pre.get(n, 0.0) for n in stage_chain(plan, arm.pretrain))
        cost[arm.name] = {"train": train_s / 60, "pretrain": pretrain_s / 60}
        learning[arm.name] = learning_summary([arm_dir(out, f, arm, s) for f in fold_indices
                                               for s in plan.seeds])
    scaling = scaling_curves(plan)
    gains = {}
    for curve, members in scaling.items():
        (lo, _), (hi, _) = members[0], members[-1]
        gains[curve] = paired_compare(y, stacked[lo][1], stacked[lo][2], stacked[hi][1], stacked[hi][2], pids, labels,
                                      names=(lo, hi), n_resamples=n_resamples, groups=groups)
    contrasts = {}
    base = next((c for c, members in scaling.items() if plan.reference in dict(members)), None)
    for curve, members in scaling.items():
        if base is None or curve == base or (members[0][1], members[-1][1]) != (scaling[base][0][1],
                                                                                  scaling[base][-1][1]):
            continue                                   # gains over different shares do not subtract
        (a_lo, f_lo), (a_hi, f_hi) = scaling[base][0], scaling[base][-1]
        b_lo, b_hi = members[0][0], members[-1][0]
        contrasts[curve] = gain_contrast(y, *[stacked[a][1:3] for a in (a_lo, a_hi, b_lo, b_hi)], pids, labels,
                                         curves=(base, curve), shares=(f"{f_lo:g}", f"{f_hi:g}"),
                                         n_resamples=n_resamples, groups=groups)
    per_seed = {a: np.split(stacked[a][1], len(plan.seeds)) for a in names}
    identical = [a for a in names if len(plan.seeds) > 1 and all(np.array_equal(p, per_seed[a][0])
                                                                  for p in per_seed[a][1:])]
    return ArmsResult(names, plan.reference, scores, comparisons, cost, learning, info,
                      probes=pretrain_probes(out, plan, fold_indices), scaling=scaling, scaling_gain=gains,
                      scaling_contrast=contrasts, identical_seeds=identical,
                      cells=fold_seed_cells(y_all, results, labels, fold_indices))


def scaling_curves(plan) -> dict[str, list[tuple[str, float]]]:
    """Arms that differ only in ``train_fraction``, grouped (curves of one arm are left out) and
    named after their largest-share arm.

    Label scaling (arms with fewer labels than their pre-training stage saw patients, the stage's share fixed)
    is a curve of its own, named ``"<largest-share arm> (labels)"``; the arm that reads a stage at the stage's own
    share ends both its data-scaling curve and the label-scaling curve of that stage."""
    groups: dict[str, list[tuple[str, float]]] = {}
    label_keys = set()
    for arm in plan.arms:
        key = scaling_key(plan, arm)
        groups.setdefault(key, []).append((arm.name, arm.train_fraction))
        if arm.pretrain and plan.pretrain[arm.pretrain].train_fraction != arm.train_fraction:
            label_keys.add(key)
    for arm in plan.arms:   # the shared end point joins the label-scaling curve of its stage, if the plan has one
        if arm.pretrain and plan.pretrain[arm.pretrain].train_fraction == arm.train_fraction:
            key = scaling_key(plan, arm, label_curve=True)
            if key in label_keys:
                groups[key].append((arm.name, arm.train_fraction))
    curves = {}
    for key, members in groups.items():
        members = sorted(members, key=lambda m: m[1])
        if len({f for _, f in members}) > 1:
            curves[members[-1][0] + (" (labels)" if key in label_keys else "")] = members
    return curves
