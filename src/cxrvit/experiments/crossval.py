"""The fold machinery every arm runs on: protocol, patient-wise folds, one fold, pooling.

On a small labelled set (the 1,099-image NIH sample) a single split leaves too few test patients
to tell two strategies apart, so every image is held out once: in each of k patient-wise folds an
arm trains on the other folds (with its own patient-wise validation carve-out, used for the
checkpoint choice and the max-F1 thresholds) and predicts the held-out fold. The out-of-fold
predictions are pooled — each image keeps the thresholds of the fold model that scored it — and
scored once (``arms_table.py``).

On the full NIH dataset (``protocol: official``, or ``auto`` above ~20k images) the same harness
runs NIH's official split instead: train_val -> train/val carve-out, test_list -> test.

A fold's bundle lives in ``<fold dir>/run/`` and its held-out predictions in ``heldout.npz``,
saved with the hash of the arm's identity (``identity.py``) and its *pins* (train_fraction, pre-training stage,
``init`` file checksum: ``plan.fold_pins``); a rerun reuses them while both are unchanged, so an interrupted
benchmark resumes where it stopped. Predictions saved before pins existed are accepted on the hash alone.
"""
from __future__ import annotations

import functools
import json
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from cxrvit.data import splits
from cxrvit.evaluation.evaluate import bundle_thresholds, check_thresholds_held_out, predict_rows
from cxrvit.experiments.identity import config_hash, config_identity, differing_keys, hash_matches
from cxrvit.fileio import atomic_write
from cxrvit.inference.bundle import load_bundle
from cxrvit.labels import SCORED_TARGETS
from cxrvit.runtime import machine_description, resolve_device
from cxrvit.training.config import config_from_dict
from cxrvit.training.engine import train

OFFICIAL_ABOVE = 20_000  # images; above this a cache with the official split runs it by default
PREDICTIONS = "heldout.npz"


@dataclass
class FoldPredictions:
    rows: np.ndarray        # held-out cache rows
    probs: np.ndarray       # [n, K]
    thresholds: np.ndarray  # [K], tuned on this fold's validation carve-out
    labels: list[str]
    seconds: float          # train + predict wall time of this fold
    # where the fold was trained: "commit <sha> on <machine>"; "" in files saved before it was kept. A table
    # re-scored later (another commit, another machine) still names who made each arm's predictions.
    provenance: str = ""


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
    if protocol == "official":
        return [splits.official_split(cache)]
    rows = np.arange(len(cache), dtype=np.int64)
    folds = splits.patient_kfold(rows, cache.patient_ids, k=k, seed=seed, labels=cache.labels(list(SCORED_TARGETS)))
    for train_rows, heldout in folds:
        splits.assert_patient_disjoint(cache.patient_ids, train_rows, heldout)
    return folds



# --------------------------------------------------------------------------- one fold


def run_fold(cfg, cache, train_rows, heldout, fold_dir: Path, *, device=None, progress: bool = True,
             train_fn=None, init=None, pins: dict | None = None) -> FoldPredictions:
    """Train ``cfg`` on ``train_rows`` (minus its validation carve-out), predict ``heldout``.

    Finished predictions are reused while the arm's identity and the fold's rows are unchanged;
    ``pins`` (``plan.fold_pins``) are saved with the predictions and checked on reuse;
    ``train_fn`` replaces the engine (``training.engine.train``) in tests."""
    git_commit()                      # the provenance is the code loaded now, not HEAD when the fold ends
    pred_path = fold_dir / PREDICTIONS
    if pred_path.is_file():
        saved, chash = load_fold(pred_path)
        if not np.array_equal(saved.rows, heldout):
            raise ValueError(f"{pred_path}: made for other held-out images (another fold plan); "
                             "use a new OUT folder")
        if not hash_matches(chash, cfg):
            raise ValueError(f"{pred_path}: made with a different config{_config_change(fold_dir, cfg)}; "
                             "give the arm a new name or use a new OUT folder")
        check_pins(pred_path, pins)
        return saved
    train_fn = train_fn or train
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
                           time.time() - start, f"commit {git_commit()} on {machine_description(device)}")
    save_fold(pred_path, fold, config_hash(cfg), pins)
    return fold


def _config_change(fold_dir: Path, cfg) -> str:
    """The differing keys, read from the config the fold's run saved (when it is there and readable)."""
    try:
        before = config_from_dict(yaml.safe_load((fold_dir / "run" / "config.yaml").read_text()) or {})
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        return ""
    # The run records the file it started from in model.init (training.engine.train); an arm's start is its
    # stage or init, pinned by sha256 (plan.fold_pins), so model.init there is no change of the arm's.
    before = replace(before, model=replace(before.model, init=cfg.model.init))
    keys = differing_keys(config_identity(before), config_identity(cfg))
    return f" ({'; '.join(keys)})" if keys else ""


def save_fold(path: Path, fold: FoldPredictions, chash: str, pins: dict | None = None) -> None:
    extra = {"pins": json.dumps(pins, sort_keys=True)} if pins is not None else {}
    atomic_write(path, lambda tmp: np.savez(tmp, rows=fold.rows, probs=fold.probs, thresholds=fold.thresholds,
                                            labels=np.array(fold.labels), seconds=fold.seconds, config_hash=chash,
                                            provenance=fold.provenance, **extra))


def check_pins(path: Path, pins: dict | None) -> None:
    """Refuse predictions whose saved pins differ from ``pins``. Predictions saved before pins existed (or a key
    added since) pass: ``OUT/identity.yaml`` vouches for them, as it did before."""
    if pins is None:
        return
    with np.load(path, allow_pickle=False) as z:
        saved = json.loads(str(z["pins"])) if "pins" in z.files else {}
    diffs = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in pins.items() if k in saved and saved[k] != v]
    if diffs:
        raise ValueError(f"{path}: made for another arm ({'; '.join(diffs)}), e.g. a folder copied under another "
                         "arm's name; delete it to train this arm, or use a new OUT folder")


def load_fold(path: Path) -> tuple[FoldPredictions, str]:
    with np.load(path, allow_pickle=False) as z:
        fold = FoldPredictions(z["rows"], z["probs"], z["thresholds"], [str(s) for s in z["labels"]],
                               float(z["seconds"]), str(z["provenance"]) if "provenance" in z.files else "")
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


# --------------------------------------------------------------------------- provenance of the numbers


@functools.cache
def git_commit() -> str:
    """The commit (``+dirty`` with uncommitted changes) of the code this process runs: read once, at the first
    call, which :func:`run_fold` and ``run_arms`` make before training anything. Read again at each fold's end, it
    named whatever HEAD was by then, and a long benchmark outlives commits made beside it."""
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
