"""Does SSL pre-training help? SSL-initialised ``improved`` vs from-scratch ``improved`` and ``baseline``.

The cross-validation benchmark of the evaluation part (:mod:`cxrvit.experiments.crossval`), with
one more arm per SSL method. In each patient-wise fold:

1. pre-train the method on the images of the fold's *training* patients only (plus any extra
   unlabelled caches, e.g. another hospital's CXRs) - the held-out fold is never seen, not even
   unlabelled; the k-NN / linear probes are fitted and scored inside the training patients too;
2. fine-tune ``improved`` from that backbone (same fine-tune budget as the scratch arms);
3. predict the held-out fold.

Out-of-fold predictions are pooled and scored once per arm, and every SSL arm is compared with
scratch ``improved`` by the paired patient bootstrap. Everything lands in ``OUT/fold<i>/<arm>/``
and a rerun resumes: finished pre-trainings and folds are reused.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cxrvit.labels import SCORED_TARGETS

SCRATCH = ("baseline", "improved")


@dataclass
class SSLBenchResult:
    arms: list[str]
    scores: dict                      # arm -> EvalResult
    comparisons: dict                 # arm -> Comparison (arm vs scratch improved)
    probes: dict                      # method -> list per fold of (first probe, last probe)
    seconds: dict                     # arm -> {"pretrain": s, "finetune": s} summed over folds
    info: dict = field(default_factory=dict)

    def markdown(self) -> str:
        i = self.info
        lines = [f"### SSL pre-training vs from scratch: {i['folds']}-fold patient-wise CV, pooled out-of-fold",
                 "",
                 f"- data: `{i['data']}` ({i['n_images']} images, {i['n_patients']} patients); extra unlabelled "
                 f"pre-training caches: {', '.join(f'`{e}`' for e in i['extra']) or 'none'}",
                 f"- fine-tune (every arm): `improved`/`baseline` with `{' '.join(i['finetune_overrides']) or 'no overrides'}`",
                 f"- pre-training: recipe `<method>` with `{' '.join(i['ssl_overrides']) or 'no overrides'}`, "
                 "on the training folds' images only",
                 f"- machine: {i['machine']}; commit `{i['commit']}`; wall time {i['wall_seconds'] / 60:.1f} min",
                 f"- command: `{i['command']}`",
                 "",
                 "| arm | mean AUROC (scored) [95% CI] | " + " | ".join(f"AUROC {t}" for t in i["targets"])
                 + " | mean F1 (scored) [95% CI] | pre-train min | fine-tune min |",
                 "| --- | ---: | " + " | ".join("---:" for _ in i["targets"]) + " | ---: | ---: | ---: |"]
        for arm in self.arms:
            s = self.scores[arm]
            au = " | ".join(_f(s.targets[t]["auroc"]) for t in i["targets"])
            sec = self.seconds[arm]
            lines.append(f"| {arm} | {s.headline['mean_auroc_scored'].fmt()} | {au} | "
                         f"{s.headline['mean_f1_scored'].fmt()} | {sec['pretrain'] / 60:.1f} | {sec['finetune'] / 60:.1f} |")
        if self.probes:
            lines += ["", "Frozen-feature probes inside the training folds (mean AUROC of the scored targets; "
                          "k-NN k=20 cosine / logistic regression; CLS token | mean of patch tokens), "
                          "random init -> end of pre-training, mean over folds:", "",
                      "| method | k-NN CLS | k-NN mean-pool | linear CLS | linear mean-pool |", "| --- | --- | --- | --- | --- |"]
            for m, per_fold in self.probes.items():
                cells = []
                for key in ("knn_cls_auroc", "knn_mean_auroc", "linear_cls_auroc", "linear_mean_auroc"):
                    a = np.nanmean([p[0][key] for p in per_fold if p[0]])
                    b = np.nanmean([p[1][key] for p in per_fold if p[1]])
                    cells.append(f"{a:.3f} -> {b:.3f}")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        for comp in self.comparisons.values():
            a, b = comp.names
            lines += ["", f"**{b} vs {a}** (paired patient bootstrap, differences {b} − {a})", "", comp.markdown()]
        return "\n".join(lines) + "\n"


def _f(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def method_overrides(overrides: Sequence[str], method: str) -> list[str]:
    """Overrides for every method (``key=value``) plus this method's own (``method:key=value``)."""
    out = []
    for o in overrides:
        key = o.split("=", 1)[0]
        if ":" in key:
            who, rest = o.split(":", 1)
            if who == method:
                out.append(rest)
        else:
            out.append(o)
    return out


def _finetune_seconds(fold_dir: Path) -> float:
    from cxrvit.experiments.crossval import PREDICTIONS, load_fold

    return load_fold(fold_dir / PREDICTIONS)[0].seconds


def run_ssl_bench(data, out, *, methods: Sequence[str] = ("dino", "mae", "ijepa"), folds: int = 5,
                  ssl_overrides: Sequence[str] = (), finetune_overrides: Sequence[str] = (),
                  extra: Sequence[str] = (), seed: int = 0, n_resamples: int | None = None, device=None,
                  probe: bool = True, command: str = "", cache=None, log: Callable[[str], None] = print,
                  progress: bool = False) -> SSLBenchResult:
    from cxrvit.data import splits
    from cxrvit.data.cache import CXRCache
    from cxrvit.evaluation.bootstrap import DEFAULT_RESAMPLES
    from cxrvit.evaluation.compare import paired_compare
    from cxrvit.experiments.crossval import git_commit, load_configs, plan_folds, pool, run_fold
    from cxrvit.runtime import machine_description
    from cxrvit.evaluation.evaluate import score_predictions
    from cxrvit.ssl.config import load_pretrain_recipe
    from cxrvit.ssl.encoder import BACKBONE_FILE
    from cxrvit.ssl.pretrain import pretrain
    from cxrvit.ssl.probe import ProbeSet
    from cxrvit.training.engine import train

    started = time.time()
    n_resamples = DEFAULT_RESAMPLES if n_resamples is None else n_resamples
    cache = cache if cache is not None else CXRCache(data)
    extra_caches = [CXRCache(e) for e in extra]
    ft_overrides = list(finetune_overrides) + ([f"engine.device={device}"] if device else [])
    cfgs = load_configs(SCRATCH, ft_overrides)
    plan = plan_folds(cache, "cv", folds, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arms = list(SCRATCH) + [f"{m}+improved" for m in methods]
    results = {a: [] for a in arms}
    seconds = {a: {"pretrain": 0.0, "finetune": 0.0} for a in arms}
    probes: dict[str, list] = {m: [] for m in methods} if probe else {}
    pids = cache.patient_ids
    for f, (train_rows, heldout) in enumerate(plan):
        fold_dir = out / f"fold{f}"
        for r in SCRATCH:
            log(f"[bench ssl] fold {f + 1}/{len(plan)} {r} from scratch")
            results[r].append(run_fold(cfgs[r], cache, train_rows, heldout, fold_dir / r, device=device,
                                       progress=progress))
            seconds[r]["finetune"] += _finetune_seconds(fold_dir / r)
        for m in methods:
            arm = f"{m}+improved"
            pdir = fold_dir / f"pretrain-{m}"
            pcfg = load_pretrain_recipe(m, method_overrides(ssl_overrides, m) +
                                        ([f"engine.device={device}"] if device else []), method=m)
            probe_set = None
            if probe:  # the probe's labels come from the fold's training patients only
                fit, val = splits.carve_validation(train_rows, pids, fraction=0.2, seed=seed)
                splits.assert_patient_disjoint(pids, fit, val, heldout)
                probe_set = ProbeSet(cache, np.asarray(fit), np.asarray(val))
            timing = pdir / "bench_seconds.json"
            if not (pdir / "pretrain.json").is_file():
                log(f"[bench ssl] fold {f + 1}/{len(plan)} pre-training {m} on {len(train_rows)} training-fold images"
                    + (f" + {sum(len(c) for c in extra_caches)} extra" if extra_caches else ""))
                t = time.time()
                pretrain(pcfg, [cache, *extra_caches], pdir, rows=[train_rows] + [None] * len(extra_caches),
                         probe=probe_set, quiet=not progress)
                timing.write_text(json.dumps({"seconds": time.time() - t}))
            summary = json.loads((pdir / "pretrain.json").read_text())
            if probe and summary["probes"]:
                probes[m].append((summary["probes"][0], summary["probes"][-1]))
            seconds[arm]["pretrain"] += json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
            log(f"[bench ssl] fold {f + 1}/{len(plan)} {arm}: fine-tune from {pdir / BACKBONE_FILE}")
            train_fn = functools.partial(train, init=str(pdir / BACKBONE_FILE))
            results[arm].append(run_fold(cfgs["improved"], cache, train_rows, heldout, fold_dir / arm, device=device,
                                         progress=progress, train_fn=train_fn))
            seconds[arm]["finetune"] += _finetune_seconds(fold_dir / arm)

    labels = [n for n in results[arms[0]][0].labels if all(n in fr.labels for a in arms for fr in results[a])]
    pooled = {a: pool(results[a], labels) for a in arms}
    rows = pooled[arms[0]][0]
    if len(rows) != len(cache) or not all(np.array_equal(rows, pooled[a][0]) for a in arms):
        raise ValueError("the arms were not scored on the same, complete set of out-of-fold images")
    y = cache.labels(labels)[rows].astype(np.float64)
    p = np.asarray(pids)[rows]
    provenance = {"split": "val carve-out of each fold's training patients", "verified": True, "in_sample": False,
                  "tuning_images": None, "overlap_images": 0}
    scores = {a: score_predictions(y, pooled[a][1], pooled[a][2], p, labels, provenance=provenance,
                                   split="pooled out-of-fold", n_resamples=n_resamples, seed=seed) for a in arms}
    comparisons = {a: paired_compare(y, pooled["improved"][1], pooled["improved"][2], pooled[a][1], pooled[a][2], p,
                                     labels, names=("improved", a), n_resamples=n_resamples, seed=seed)
                   for a in arms if a not in SCRATCH}
    comparisons["improved-vs-baseline"] = paired_compare(y, pooled["baseline"][1], pooled["baseline"][2],
                                                       pooled["improved"][1], pooled["improved"][2], p, labels,
                                                       names=("baseline", "improved"), n_resamples=n_resamples,
                                                       seed=seed)
    result = SSLBenchResult(arms, scores, comparisons, probes, seconds, info={
        "data": str(data), "extra": list(extra), "folds": len(plan), "n_images": int(len(rows)),
        "n_patients": int(len(np.unique(p.astype(str)))), "targets": [t for t in SCORED_TARGETS if t in labels],
        "finetune_overrides": ft_overrides, "ssl_overrides": list(ssl_overrides), "methods": list(methods),
        "machine": machine_description(device), "commit": git_commit(), "wall_seconds": time.time() - started,
        "command": command or "(library call)"})
    (out / "results.md").write_text(result.markdown())
    (out / "results.json").write_text(json.dumps({
        "info": result.info, "seconds": seconds, "probes": probes,
        "scores": {a: s.to_json() for a, s in scores.items()},
        "comparisons": {a: c.to_json() for a, c in comparisons.items()}}, indent=2, default=float))
    return result
