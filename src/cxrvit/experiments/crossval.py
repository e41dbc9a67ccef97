"""``cxrvit bench recipes``: does ``improved`` beat ``baseline``? Patient-wise cross-validation.

On a small labelled set (the 1,099-image NIH sample) a single split leaves too few test patients
to tell two recipes apart, so every image is held out once: in each of k patient-wise folds each
recipe trains on the other folds (with its own patient-wise validation carve-out, used for the
checkpoint choice and the max-F1 thresholds) and predicts the held-out fold. The out-of-fold
predictions are pooled — each image keeps the thresholds of the fold model that scored it — and
scored once, with a paired patient bootstrap of improved − baseline.

On the full NIH dataset (``--protocol official``, the default above ~20k images) the same command
runs NIH's official split instead: train_val -> train/val carve-out, test_list -> test.

Everything a fold produces lives in ``OUT/fold<i>/<recipe>/`` (the bundle in ``run/``, the
held-out predictions in ``heldout.npz``); a rerun skips folds whose predictions exist, so an
interrupted benchmark resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrvit.evaluation import metrics as M
from cxrvit.evaluation.bootstrap import DEFAULT_RESAMPLES
from cxrvit.evaluation.compare import Comparison, paired_compare
from cxrvit.evaluation.evaluate import EvalResult, check_thresholds_held_out, predict_rows, score_predictions
from cxrvit.fileio import atomic_write
from cxrvit.labels import SCORED_TARGETS
from cxrvit.runtime import machine_description, resolve_device

OFFICIAL_ABOVE = 20_000  # images; above this a cache with the official split runs it by default
PREDICTIONS = "heldout.npz"


@dataclass
class FoldPredictions:
    rows: np.ndarray        # held-out cache rows
    probs: np.ndarray       # [n, K]
    thresholds: np.ndarray  # [K], tuned on this fold's validation carve-out
    labels: list[str]
    seconds: float          # train + predict wall time of this fold


@dataclass
class BenchResult:
    recipes: list[str]
    protocol: str
    folds: list[tuple[np.ndarray, np.ndarray]]
    scores: dict[str, EvalResult]
    comparison: Comparison
    per_fold: dict[str, list[float]]   # recipe -> mean F1 of the scored targets, per fold
    info: dict = field(default_factory=dict)

    def markdown(self) -> str:
        i = self.info
        a, b = self.recipes[:2]
        lines = [
            f"### {b} vs {a}: {i['protocol_text']}",
            "",
            f"- data: `{i['data']}` ({i['n_images']} images, {i['n_patients']} patients, cache {i['cache_size']} px)",
            f"- same for both recipes: images, folds, {i['epochs']} epochs, {i['img_size']} px, "
            f"model {i['arch']}, init: {i['init']}; overrides: `{' '.join(i['overrides']) or 'none'}`",
            f"- machine: {i['machine']}",
            f"- wall time: {i['train_seconds'] / 60:.1f} min of training+prediction (sum over folds), "
            f"this invocation {i['wall_seconds'] / 60:.1f} min; commit `{i['commit']}`",
            f"- command: `{i['command']}`",
            "",
            self.comparison.markdown(),
            "",
            f"Per-fold mean F1 (scored targets): "
            + "; ".join(f"{r}: " + ", ".join(f"{v:.3f}" for v in self.per_fold[r]) for r in self.recipes),
            f"Mean AUROC (scored): " + ", ".join(f"{r} {self.scores[r].headline['mean_auroc_scored'].fmt()}"
                                                 for r in self.recipes),
        ]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"info": self.info, "recipes": self.recipes, "comparison": self.comparison.to_json(),
                "per_fold_mean_f1_scored": self.per_fold,
                "scores": {r: s.to_json() for r, s in self.scores.items()}}


# --------------------------------------------------------------------------- plan


def choose_protocol(cache, protocol: str = "auto") -> str:
    has_official = "official_split" in cache.index and (cache.index["official_split"].astype(str) == "test").any()
    if protocol == "auto":
        return "official" if has_official and len(cache) > OFFICIAL_ABOVE else "cv"
    if protocol == "official" and not has_official:
        raise ValueError("--protocol official needs a cache prepared with NIH's split lists (no image is on test_list)")
    if protocol not in ("cv", "official"):
        raise ValueError(f"unknown protocol {protocol!r}; choose auto, cv or official")
    return protocol


def plan_folds(cache, protocol: str, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from cxrvit.data import splits

    if protocol == "official":
        return [splits.official_split(cache)]
    rows = np.arange(len(cache), dtype=np.int64)
    folds = splits.patient_kfold(rows, cache.patient_ids, k=k, seed=seed, labels=cache.labels(list(SCORED_TARGETS)))
    for train_rows, heldout in folds:
        splits.assert_patient_disjoint(cache.patient_ids, train_rows, heldout)
    return folds


def load_configs(recipes, overrides):
    """One config per recipe; refuse a comparison that differs in epochs, size or architecture."""
    from cxrvit.training.config import config_to_dict, load_recipe

    cfgs = {r: load_recipe(r, overrides=list(overrides)) for r in recipes}
    for key in ("schedule.epochs", "model.img_size", "model.arch"):
        values = {r: _get(config_to_dict(c), key) for r, c in cfgs.items()}
        if len(set(map(str, values.values()))) > 1:
            raise ValueError(f"recipes differ in {key} ({values}): a fair comparison needs the same value; "
                             f"set it for both with --set {key}=...")
    return cfgs


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


# Keys added to TrainConfig after held-out predictions were first hashed. At their defaults they are
# left out of the hash, so predictions made before a key existed (docs/history/benchmarks.md tables) still match
# a config that does not use it; set to anything else, they change the hash as every other key does.
LATER_KEYS = ("model.attention", "model.pos_embed", "strategy", "probe")


def config_hash(cfg) -> str:
    from cxrvit.training.config import TrainConfig, config_to_dict

    d, default = config_to_dict(cfg), config_to_dict(TrainConfig())
    for dotted in LATER_KEYS:
        *parents, leaf = dotted.split(".")
        here, there = d, default
        for part in parents:
            here, there = here[part], there[part]
        if here.get(leaf) == there[leaf]:
            del here[leaf]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- one fold


def run_fold(cfg, cache, train_rows, heldout, fold_dir: Path, *, device=None, progress: bool = True,
             train_fn=None, init=None) -> FoldPredictions:
    """Train ``cfg`` on ``train_rows`` (minus its validation carve-out), predict ``heldout``."""
    from cxrvit.data import splits
    from cxrvit.evaluation.evaluate import bundle_thresholds
    from cxrvit.inference.bundle import load_bundle

    pred_path = fold_dir / PREDICTIONS
    chash = config_hash(cfg)
    if pred_path.is_file():
        saved = load_fold(pred_path)
        if saved[1] != chash or not np.array_equal(saved[0].rows, heldout):
            raise ValueError(f"{pred_path}: made with a different config or fold; use a new --out folder")
        return saved[0]
    if train_fn is None:
        from cxrvit.training.engine import train as train_fn
    start = time.time()
    fit_rows, val_rows = splits.carve_validation(train_rows, cache.patient_ids, cfg.data.val_fraction,
                                                 cfg.data.split_seed)
    splits.assert_patient_disjoint(cache.patient_ids, fit_rows, val_rows, heldout)
    run_dir = fold_dir / "run"
    if not (run_dir / "bundle.json").is_file():
        kwargs = {"init": init} if init else {}
        train_fn(cfg, cache, fit_rows, val_rows, run_dir, device=device, resume=True, progress=progress, **kwargs)
    bundle = load_bundle(run_dir, device=resolve_device(device))
    # The fold's thresholds must come from its own carve-out, never from the fold it is scored on.
    check_thresholds_held_out(bundle.threshold_source, cache, heldout, run=str(run_dir))
    probs = predict_rows(bundle, cache, heldout, batch_size=cfg.eval.batch_size)
    fold = FoldPredictions(heldout, probs, bundle_thresholds(bundle, str(run_dir)), list(bundle.labels),
                           time.time() - start)
    save_fold(pred_path, fold, chash)
    return fold


def save_fold(path: Path, fold: FoldPredictions, chash: str) -> None:
    atomic_write(path, lambda tmp: np.savez(tmp, rows=fold.rows, probs=fold.probs, thresholds=fold.thresholds,
                                            labels=np.array(fold.labels), seconds=fold.seconds, config_hash=chash))


def load_fold(path: Path) -> tuple[FoldPredictions, str]:
    with np.load(path, allow_pickle=False) as z:
        fold = FoldPredictions(z["rows"], z["probs"], z["thresholds"], [str(s) for s in z["labels"]],
                               float(z["seconds"]))
        return fold, str(z["config_hash"])


# --------------------------------------------------------------------------- pooling and scoring


def pool(folds: list[FoldPredictions], labels: list[str]):
    """Concatenate held-out predictions in row order -> rows, probs [N,K], per-image thresholds [N,K]."""
    rows = np.concatenate([f.rows for f in folds])
    if len(np.unique(rows)) != len(rows):
        raise ValueError("an image was held out in two folds: the folds are not a partition")
    take = lambda f: [f.labels.index(n) for n in labels]
    probs = np.concatenate([f.probs[:, take(f)] for f in folds])
    thr = np.concatenate([np.broadcast_to(f.thresholds[take(f)], (len(f.rows), len(labels))) for f in folds])
    order = np.argsort(rows)
    return rows[order], probs[order], thr[order]


def run_recipes(data, out, *, recipes=("baseline", "improved"), folds: int = 5, overrides=(), protocol: str = "auto",
                seed: int = 0, n_resamples: int = DEFAULT_RESAMPLES, device=None, progress: bool = True,
                cache=None, command: str = "", train_fn=None, init=None, log=print) -> BenchResult:
    """Run (or resume) the benchmark in ``out``; see the module docstring. ``init`` is a backbone
    checkpoint both recipes start from (``train(init=...)``); ``train_fn`` replaces the engine in tests."""
    from cxrvit.data.cache import CXRCache

    started = time.time()
    if len(recipes) != 2:
        raise ValueError(f"bench recipes compares exactly two recipes (A then B, difference B − A); got {list(recipes)}")
    cache = cache if cache is not None else CXRCache(data)
    if not cache.meta.get("labelled", True):
        raise ValueError(f"{data}: an unlabelled cache cannot score recipes")
    protocol = choose_protocol(cache, protocol)
    cfgs = load_configs(recipes, overrides)
    plan = plan_folds(cache, protocol, folds, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[FoldPredictions]] = {r: [] for r in recipes}
    for f, (train_rows, heldout) in enumerate(plan):
        for r in recipes:
            log(f"[bench] fold {f + 1}/{len(plan)} recipe {r}: train {len(train_rows)} images, "
                f"held out {len(heldout)}")
            fold = run_fold(cfgs[r], cache, train_rows, heldout, out / f"fold{f}" / r, device=device,
                            progress=progress, train_fn=train_fn, init=init)
            results[r].append(fold)
    labels = [n for n in results[recipes[0]][0].labels if all(n in fr.labels for r in recipes for fr in results[r])]
    pooled = {r: pool(results[r], labels) for r in recipes}
    rows = pooled[recipes[0]][0]
    if not all(np.array_equal(rows, pooled[r][0]) for r in recipes):
        raise ValueError("the recipes were scored on different images")
    if protocol == "cv" and len(rows) != len(cache):
        raise ValueError(f"cross-validation pooled {len(rows)} predictions for {len(cache)} images")
    y = cache.labels(labels)[rows].astype(np.float64)
    pids = np.asarray(cache.patient_ids)[rows]
    provenance = {"split": "val carve-out of each fold's training patients", "verified": True, "in_sample": False,
                  "tuning_images": None, "overlap_images": 0}
    split_name = "pooled out-of-fold" if protocol == "cv" else "official test"
    scores = {r: score_predictions(y, pooled[r][1], pooled[r][2], pids, labels, provenance=provenance,
                                   split=split_name, n_resamples=n_resamples, seed=seed,
                                   info={"run": f"{r} ({len(plan)} fold models, {out})", "data": str(data)})
              for r in recipes}
    comparison = paired_compare(y, pooled[recipes[0]][1], pooled[recipes[0]][2], pooled[recipes[1]][1],
                                pooled[recipes[1]][2], pids, labels, names=tuple(recipes),
                                n_resamples=n_resamples, seed=seed)
    per_fold = {r: [_fold_mean_f1(cache, fr, labels) for fr in results[r]] for r in recipes}
    cfg0 = cfgs[recipes[0]]
    result = BenchResult(list(recipes), protocol, plan, scores, comparison, per_fold, info={
        "protocol": protocol,
        "protocol_text": (f"{len(plan)}-fold patient-wise cross-validation, pooled out-of-fold predictions"
                          if protocol == "cv" else "NIH official split (train_val -> train/val, test_list -> test)"),
        "data": str(data), "n_images": int(len(rows)), "n_patients": int(len(np.unique(pids.astype(str)))),
        "cache_size": int(cache.size), "epochs": cfg0.schedule.epochs, "img_size": cfg0.model.img_size,
        "arch": cfg0.model.arch, "overrides": list(overrides), "folds": len(plan), "seed": seed,
        "init": str(init) if init else "random (no pre-trained backbone)",
        "machine": machine_description(device), "commit": git_commit(),
        "train_seconds": float(sum(fr.seconds for r in recipes for fr in results[r])),
        "wall_seconds": time.time() - started, "command": command or "(library call)",
    })
    from cxrvit.evaluation.report import write_report

    for r in recipes:  # ROC/PR/reliability/F1-vs-trivial plots of the pooled out-of-fold predictions
        write_report(scores[r], out / f"report-{r}", title=f"{r}: {split_name} predictions")
    (out / "results.md").write_text(result.markdown())
    (out / "results.json").write_text(json.dumps(result.to_json(), indent=2))
    return result


def _fold_mean_f1(cache, fold: FoldPredictions, labels: list[str]) -> float:
    scored = [n for n in SCORED_TARGETS if n in labels]
    idx = [fold.labels.index(n) for n in scored]
    y = cache.labels(scored)[fold.rows]
    return float(M.f1_at(y, fold.probs[:, idx], fold.thresholds[idx]).mean())


# --------------------------------------------------------------------------- provenance of the numbers


def git_commit() -> str:
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
