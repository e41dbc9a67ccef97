"""``cxrvit bench arms``: N training strategies ("arms") on the same patients, one honest table.

An *arm* is a training recipe, its ``--set`` overrides, and where its backbone starts: random
init, a checkpoint file (``init``), or a self-supervised pre-training stage run *inside the
benchmark* on each fold's training images only (``pretrain``), so that no image an arm is scored
on was ever seen by any stage of that arm. Every arm trains on the same folds (patient-wise
k-fold, or NIH's official split) with the same seeds; held-out predictions are pooled over
folds, stacked over seeds, and scored once: F1 at each fold's validation-tuned thresholds,
trivial all-positive F1, AUROC, AP, each with a patient-bootstrap CI, and a *paired* patient
bootstrap of every arm against the reference arm (``baseline``).

Seeds are stacked, not averaged: with S seeds each image appears S times, once per seed's
prediction, so the numbers are the expected single-model score (not an ensemble's). A bootstrap
resample draws patients (taking all of a patient's rows) and, crossed with them, seeds (a row's
weight is the product of the two draw counts): the interval counts patients, not predictions, and
how much another seed's model would move the score (``resample_seeds``; evaluation.bootstrap).

Layout (``cxrvit bench recipes`` is a two-arm plan with the same layout; a rerun skips whatever
is finished, and a killed stage resumes from its checkpoint)::

    OUT/plan.yaml                          the arms file as last run (every arm ever run in OUT)
    OUT/identity.yaml                      what each arm and pre-training stage is: its resolved
                                           config with defaults left out (plan.py, identity.py), and
                                           the cache's checksums, size and count (``cache``)
    OUT/fold<f>/pretrain-<name>/           pre-training run on fold f's training images
    OUT/fold<f>/pretrain-<name>-seed<s>/   ... for seed s > 0 of a ``per_seed`` stage
    OUT/fold<f>/<arm>[-seed<s>]/run/       the fold model (bundle, metrics.jsonl)
    OUT/fold<f>/<arm>[-seed<s>]/heldout.npz
    OUT/results.md, OUT/results.json       the table
    OUT/results-vs-<arm>.md|json           the same arms paired with another reference (``--reference``)
    OUT/<tables>[-vs-<arm>].md|json        the same under another stem (``tables``): several plans may
                                           share one OUT (a stage continued from another plan's stage
                                           lives beside it), each keeping its own table
    OUT/report-<arm>/                      plots of the pooled predictions (``reports=True``)

A rerun reuses every arm and stage whose identity is unchanged, whatever happened to the text of
the arms file or to the config's list of fields (a field added at its default changes nothing),
and refuses one whose identity changed, naming it and the keys that differ. An OUT is tied to the cache it
was first run on (its COMPLETE checksums): another cache is refused, whatever its path.

Two processes may work on one OUT at the same time on disjoint arms (``--only``); a stage that
another live process is running is refused, never run twice (``<stage>/.lock``, a kernel lock that a
killed worker releases with its process).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import yaml

from cxrvit.data import splits
from cxrvit.data.cache import CXRCache
from cxrvit.evaluation.report import write_report
from cxrvit.experiments.arms_table import score_arms
from cxrvit.experiments.crossval import (FoldPredictions, check_pins, choose_protocol, git_commit, load_fold,
                                         plan_folds, run_fold)
from cxrvit.experiments.identity import (cache_differences, cache_identity, differing_keys, hash_matches,
                                         upgrade_identity, upgrade_pretrain_identity)
from cxrvit.experiments.plan import (Arm, ArmsPlan, PretrainSpec, arm_config, arm_dir, arm_identity, check_starts,
                                     fold_pins, fraction_seed, pretrain_config, pretrain_dir, pretrain_dirs, pretrain_identity)
from cxrvit.fileio import LockHeld, atomic_write, exclusive_lock
from cxrvit.runtime import machine_description
import cxrvit.ssl.pretrain as ssl_pretrain   # called through the module: tests stand in a fake engine
from cxrvit.ssl.probe import ProbeSet

PLAN_FILE = "plan.yaml"
IDENTITY_FILE = "identity.yaml"


# --------------------------------------------------------------------------- stages


class StageLock:
    """Refuse to run a stage that a live process already runs (two workers on one OUT).

    ``<stage>/.lock`` is held through :func:`~cxrvit.fileio.exclusive_lock`: a worker that was killed
    released it with its process, so its stage is simply taken up again by the next run.
    """

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self._held = None

    def __enter__(self):
        self._held = exclusive_lock(self.path)
        try:
            self._held.__enter__()
        except LockHeld as exc:
            raise RuntimeError(f"{self.path.parent}: process {exc.holder or '(unknown)'} is running this stage; "
                               "give the other worker different --only arms") from None
        return self

    def __exit__(self, *exc):
        return self._held.__exit__(*exc)


def run_pretrain_stage(plan: ArmsPlan, name: str, cache, train_rows: np.ndarray, heldout: np.ndarray,
                       out: Path, fold: int, *, seed: int = 0, device=None, quiet: bool = False, log=print) -> Path:
    """Pre-train on this fold's training images (+ extra caches); returns the backbone file. A stage that
    continues another (``init_from``) runs that one first, in the same fold and seed, and starts from its
    ``last.pt``."""
    spec = plan.pretrain[name]
    folder = pretrain_dir(out, fold, name, spec, seed)
    backbone = folder / "backbone.safetensors"
    cost = folder / "cost.json"
    if backbone.is_file() and cost.is_file():
        return backbone
    if cost.is_file():
        # A finished stage copied back without its weights (bench/results/collect.sh keeps the record only):
        # running it again would replace that record, so say what to do instead of doing it.
        raise FileNotFoundError(f"{folder}: pre-training {name!r} finished here (cost.json) but its "
                                "backbone.safetensors is not there (a copy without weights?); put the weights back, "
                                "or delete cost.json to pre-train it again")
    cfg = pretrain_config(spec, device, seed)
    if spec.init_from:
        parent = run_pretrain_stage(plan, spec.init_from, cache, train_rows, heldout, out, fold, seed=seed,
                                    device=device, quiet=quiet, log=log).parent / "last.pt"
        if not parent.is_file():
            raise FileNotFoundError(f"pre-training {name!r} continues {spec.init_from!r}, whose {parent} is missing "
                                    "(only its exported backbone is there); delete that stage's backbone.safetensors "
                                    "and cost.json to pre-train it again")
        cfg = replace(cfg, init=str(parent))
    extra = [CXRCache(p) for p in spec.extra_data]
    held_names = set(np.asarray(cache.index["image"])[heldout].astype(str)) if "image" in cache.index else set()
    for path, c in zip(spec.extra_data, extra):
        if "image" in c.index and held_names & set(c.index["image"].astype(str)):
            raise ValueError(f"pre-training {name!r}: extra cache {path} holds images this fold scores; "
                             "pre-training must never see them")
    # The probe (monitoring only) trains and scores inside this fold's training patients.
    p_train, p_val = splits.carve_validation(train_rows, cache.patient_ids, fraction=0.2, seed=cfg.engine.seed)
    probe = ProbeSet(cache, np.asarray(p_train), np.asarray(p_val))
    log(f"[arms] pre-training {name} ({spec.method}) in {folder}: {len(train_rows)} fold-training images"
        + (f", continuing {spec.init_from}" if spec.init_from else "")
        + "".join(f" + {len(c)} from {p}" for p, c in zip(spec.extra_data, extra)))
    with StageLock(folder):
        result = ssl_pretrain.pretrain(cfg, [cache] + extra, folder, rows=[train_rows] + [None] * len(extra),
                                       probe=probe, resume=True, quiet=quiet)
        # The random-init probe (epoch 0, when the recipe runs one) and the last go into the arms table.
        history = result.history
        probes = [history[0] if history[0].get("epoch") == 0 else None, history[-1]] if history else []
        # seconds: the whole stage, every process a resume stitched together (ssl.pretrain keeps the tally)
        cost.write_text(json.dumps({"seconds": result.seconds, "steps": result.steps,
                                    "images": int(len(train_rows) + sum(len(c) for c in extra)),
                                    "probes": probes}, default=float))
    return Path(result.backbone)


def run_arm_fold(plan: ArmsPlan, arm: Arm, seed: int, cache, fold: int, train_rows, heldout, out: Path, *,
                 device=None, progress: bool = True, train_fn=None, quiet: bool = False,
                 log=print) -> FoldPredictions:
    folder = arm_dir(out, fold, arm, seed)
    cfg = arm_config(plan, arm, seed)
    pins = fold_pins(arm)
    # A finished arm is read back before its pre-training stage is looked at: results copied into a
    # new OUT without the (83-280 MB) weights must not re-run the pre-training they were made with.
    if (folder / "heldout.npz").is_file():
        return run_fold(cfg, cache, train_rows, heldout, folder, pins=pins)
    init = arm.init
    if arm.pretrain:
        init = str(run_pretrain_stage(plan, arm.pretrain, cache, train_rows, heldout, out, fold,
                                      seed=seed, device=device, quiet=quiet, log=log))
    log(f"[arms] fold {fold} arm {arm.name} seed {seed}: train {len(train_rows)} images, held out {len(heldout)}")
    with StageLock(folder):
        return run_fold(cfg, cache, train_rows, heldout, folder, device=device, progress=progress,
                        train_fn=train_fn, init=init, pins=pins)


# --------------------------------------------------------------------------- the benchmark


def run_arms(plan: ArmsPlan, data, out, *, only=None, device=None, progress: bool = True, cache=None,
             n_resamples: int | None = None, command: str = "", train_fn=None, reports: bool = False, log=print,
             reference: str | None = None, tables: str = "results", resample_seeds: bool = True):
    """Run (or resume) every stage this invocation owns, then score if every arm is complete.

    Returns the :class:`~cxrvit.experiments.arms_table.ArmsResult`, or ``None`` when stages of
    arms outside ``only`` are still missing (another worker's). ``reports`` also writes each arm's
    ROC/PR/reliability/F1-vs-trivial plots into ``OUT/report-<arm>/``. ``reference`` pairs every
    arm with another arm than the plan's; that table goes to ``OUT/results-vs-<reference>.md|json``
    (it changes no stage, so a finished benchmark is only re-scored). ``tables`` is the file stem of the
    scored tables (``OUT/<tables>.md``, ``OUT/<tables>-vs-<reference>.md``), for a plan that shares its OUT
    with another plan whose ``results.md`` must stay. ``resample_seeds`` False holds several seeds fixed in the
    bootstrap (patients only), as tables scored before 6 December did.
    """
    started = time.time()
    out = Path(out)
    git_commit()                        # read once, before any stage: the commit of the code that runs them
    check_starts(plan)
    reference = reference or plan.reference
    if not tables or Path(tables).name != tables or tables.startswith("."):
        raise ValueError(f"tables {tables!r}: give a plain file stem (no folder, no leading dot), e.g. results-budget")
    if reference not in [a.name for a in plan.arms]:
        raise ValueError(f"reference {reference!r} is not an arm of the plan ({', '.join(a.name for a in plan.arms)})")
    cache = cache if cache is not None else CXRCache(data)
    if not cache.meta.get("labelled", True):
        raise ValueError(f"{data}: an unlabelled cache cannot score arms")
    protocol = choose_protocol(cache, plan.protocol)
    all_folds = plan_folds(cache, protocol, plan.folds, plan.fold_seed)
    indices = list(range(len(all_folds))) if plan.run_folds is None else list(plan.run_folds)
    if not indices or any(not 0 <= i < len(all_folds) for i in indices) or len(set(indices)) != len(indices):
        raise ValueError(f"run_folds {plan.run_folds} must be distinct fold numbers in 0..{len(all_folds) - 1}")
    folds = {i: all_folds[i] for i in indices}
    _check_plan_file(plan, out, cache_identity(cache, getattr(cache, "root", data)), log)
    mine = [plan.arm(n) for n in only] if only else plan.arms
    for f, (train_rows, heldout) in folds.items():
        for seed in plan.seeds:
            for arm in mine:
                rows = splits.patient_subset(train_rows, cache.patient_ids, arm.train_fraction, fraction_seed(plan, f))
                run_arm_fold(plan, arm, seed, cache, f, rows, heldout, out, device=device,
                             progress=progress, train_fn=train_fn, quiet=not progress, log=log)
    results, missing = {}, []
    for arm in plan.arms:
        for seed in plan.seeds:
            for f, (_, heldout) in folds.items():
                path = arm_dir(out, f, arm, seed) / "heldout.npz"
                if not path.is_file():
                    missing.append(str(path))
                    continue
                fold, chash = load_fold(path)
                if not hash_matches(chash, arm_config(plan, arm, seed)) or not np.array_equal(fold.rows, heldout):
                    raise ValueError(f"{path}: made with a different config or fold; use a new OUT folder")
                check_pins(path, fold_pins(arm))
                results.setdefault(arm.name, {}).setdefault(seed, []).append(fold)
    if missing:
        log(f"[arms] {len(missing)} fold predictions still missing (other workers'?), e.g. {missing[0]}; "
            "rerun to score when they exist")
        return None
    info = {"protocol": protocol, "folds": len(all_folds), "scored_folds": indices, "seeds": list(plan.seeds),
            "data": str(data),
            "cache_size": int(cache.size), "overrides": list(plan.overrides), "machine": machine_description(device),
            "commit": git_commit(), "command": command or "(library call)", "wall_seconds": time.time() - started,
            "trained_by": {a: sorted({f.provenance for seed in per for f in per[seed]}) for a, per in results.items()},
            "pretrain_seconds": _pretrain_seconds(out, plan, indices),
            # images each arm trained on (validation carve-out included), mean over the scored folds
            "train_images": {a.name: float(np.mean([len(splits.patient_subset(folds[f][0], cache.patient_ids,
                                                                               a.train_fraction, fraction_seed(plan, f)))
                                                    for f in indices])) for a in plan.arms}}
    result = score_arms(replace(plan, reference=reference), cache, results, indices, out, info,
                        n_resamples=n_resamples, resample_seeds=resample_seeds)
    if reports:
        for name, score in result.scores.items():
            write_report(score, out / f"report-{name}", title=f"{name}: {score.split} predictions")
    stem = tables if reference == plan.reference else f"{tables}-vs-{reference}"
    # Replaced, never rewritten in place: an OUT hard-linked from another (cp -al) leaves the other's tables alone.
    atomic_write(out / f"{stem}.md", lambda tmp: tmp.write_text(result.markdown()))
    # allow_nan=False: to_json maps undefined numbers to null; a NaN past it must fail, not write bad JSON.
    text = json.dumps(result.to_json(), indent=2, allow_nan=False)
    atomic_write(out / f"{stem}.json", lambda tmp: tmp.write_text(text))
    return result


def _pretrain_seconds(out: Path, plan: ArmsPlan, fold_indices: list[int]) -> dict[str, float]:
    total = {}
    for name in plan.pretrain:
        for folder in pretrain_dirs(out, plan, name, fold_indices):
            if (folder / "cost.json").is_file():
                total[name] = total.get(name, 0.0) + json.loads((folder / "cost.json").read_text())["seconds"]
    return total


def _check_plan_file(plan: ArmsPlan, out: Path, cache_ident: dict, log=print) -> None:
    """Arms can be added to a finished benchmark and finished arms reused while their identity holds;
    the folds and the cache cannot change under it. An OUT made before caches were recorded is not checked
    (and gets no record: nothing vouches for the cache it was made with)."""
    out.mkdir(parents=True, exist_ok=True)
    path, ident_path = out / PLAN_FILE, out / IDENTITY_FILE
    now = asdict(plan)
    ident = {"arms": {a.name: arm_identity(plan, a) for a in plan.arms},
             "pretrain": {n: pretrain_identity(s) for n, s in plan.pretrain.items()}}
    if path.is_file():
        before = yaml.safe_load(path.read_text()) or {}
        for key in ("protocol", "folds", "fold_seed", "reference"):
            if before.get(key) != now[key]:
                raise ValueError(f"{path}: this OUT was made with {key}={before.get(key)!r}, the plan now says "
                                 f"{now[key]!r}; use a new OUT folder")
        ident_before = _identities_before(before, ident_path)
        _check_cache(out, ident_before.get("cache"), cache_ident, log)
        for kind, what, hint in (("pretrain", "pre-training", "give it a new name"),
                                 ("arms", "arm", "give it a new name or use a new OUT folder")):
            for name, new in ident[kind].items():
                old = ident_before[kind].get(name)
                if old is not None and "init_sha256" not in old:   # recorded before init files were hashed
                    new = {k: v for k, v in new.items() if k != "init_sha256"}
                if old is not None and old != new:
                    file = (f"; init file {new.get('init')} is not the file it was run with"
                            if old.get("init_sha256") not in (None, new.get("init_sha256")) else "")
                    raise ValueError(f"{path}: {what} {name!r} changed since it was run "
                                     f"({'; '.join(differing_keys(old, new))}{file}); {hint}")
        merged = {a["name"]: a for a in before.get("arms", [])} | {a["name"]: a for a in now["arms"]}
        now = now | {"arms": list(merged.values()),
                     "pretrain": (before.get("pretrain") or {}) | now["pretrain"],
                     "seeds": sorted(set(before.get("seeds", [])) | set(now["seeds"]))}
        ident = {k: ident_before[k] | ident[k] for k in ("arms", "pretrain")}
        if ident_before.get("cache") is not None:
            ident["cache"] = cache_ident
    else:
        ident["cache"] = cache_ident
    atomic_write(path, lambda tmp: tmp.write_text(yaml.safe_dump(now, sort_keys=False)))
    atomic_write(ident_path, lambda tmp: tmp.write_text(yaml.safe_dump(ident, sort_keys=False)))


def _check_cache(out: Path, before: dict | None, now: dict, log) -> None:
    if before is None:
        log(f"[arms] {out} records no cache (made before caches were recorded): could not check that "
            f"{now['data']} is the cache its finished arms were run on")
        return
    diffs = cache_differences(before, now)
    if diffs:
        raise ValueError(f"{out} was run on the cache {before.get('data')}; {now['data']} is another cache "
                         f"({'; '.join(diffs)}): its finished arms would be relabelled as this cache's. "
                         "Use a new --out")


def _identities_before(before: dict, ident_path: Path) -> dict:
    """The identities recorded in OUT; for an OUT written before ``identity.yaml`` existed, those of
    its ``plan.yaml`` resolved now (an arm that no longer resolves is left to the per-fold hash check)."""
    if ident_path.is_file():
        saved = yaml.safe_load(ident_path.read_text()) or {}
        arms = {name: {**ident, "config": upgrade_identity(ident.get("config") or {})}
                for name, ident in (saved.get("arms") or {}).items()}
        stages = {name: {**ident, "config": upgrade_pretrain_identity(ident.get("config") or {})}
                  for name, ident in (saved.get("pretrain") or {}).items()}
        return {"arms": arms, "pretrain": stages, "cache": saved.get("cache")}
    old = ArmsPlan(arms=[], overrides=list(before.get("overrides") or []))
    found = {"arms": {}, "pretrain": {}, "cache": None}
    for name, spec in (before.get("pretrain") or {}).items():
        try:
            found["pretrain"][name] = pretrain_identity(PretrainSpec(**spec))
        except (TypeError, ValueError, FileNotFoundError):
            pass
    for a in before.get("arms") or []:
        try:
            found["arms"][a["name"]] = arm_identity(old, Arm(**a))
        except (TypeError, ValueError, FileNotFoundError, KeyError):
            pass
    return found
