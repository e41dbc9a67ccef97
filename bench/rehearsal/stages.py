"""The rehearsal's in-process stages: each prints one JSON object (its own counts and timings) on stdout.

``run.py`` runs each of these in a child process under ``measure.py``, so that the peak RssAnon
it reports is that stage's alone. Every stage uses the real cache of the full tree, its real
labels and patient IDs; what is synthetic is said in the JSON's ``inputs`` field.

    python bench/rehearsal/stages.py split CACHE [--steps 2]
    python bench/rehearsal/stages.py loader CACHE [--images 6400]
    python bench/rehearsal/stages.py probe CACHE [--rows 86524]
    python bench/rehearsal/stages.py eval CACHE [--rows 25596]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def rss_anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def _official(cache):
    from cxrvit.experiments.crossval import choose_protocol, plan_folds

    protocol = choose_protocol(cache, "auto")   # what `bench arms` picks for this cache by itself
    (train_rows, test_rows), = plan_folds(cache, "official", k=1, seed=0)
    return protocol, train_rows, test_rows


def stage_split(cache, args) -> dict:
    """bench/arms/official.yaml's planning on this cache, then the first training steps of its baseline arm."""
    import torch

    from cxrvit.data import splits
    from cxrvit.experiments.plan import arm_config, load_plan
    from cxrvit.engine import distributed as dist_
    from cxrvit.training.engine import Trainer

    t0 = time.perf_counter()
    plan = load_plan(args.plan)
    protocol, train_rows, test_rows = _official(cache)
    arm = plan.arm(plan.reference)
    cfg = arm_config(plan, arm, seed=plan.seeds[0])
    # The same carve-out run_fold makes: validation patients come out of train_val, never out of test.
    fit_rows, val_rows = splits.carve_validation(train_rows, cache.patient_ids, cfg.data.val_fraction, cfg.data.split_seed)
    splits.assert_patient_disjoint(cache.patient_ids, fit_rows, val_rows, test_rows)
    pid = np.asarray(cache.patient_ids)
    counts = {name: {"images": int(len(r)), "patients": int(len(np.unique(pid[r])))}
              for name, r in (("fit", fit_rows), ("val", val_rows), ("test", test_rows))}
    plan_s = time.perf_counter() - t0

    torch.set_num_threads(args.threads)
    ctx = dist_.setup("cpu")
    out = Path(args.out)
    t1 = time.perf_counter()
    trainer = Trainer(cfg, cache, fit_rows, val_rows, out, None, ctx, resume=False, progress=False)
    setup_s = time.perf_counter() - t1
    trainer.loader.set_epoch(0)
    trainer.net.train()
    losses, step_s = [], []
    it = trainer.loader.iter_from(0)
    for _ in range(args.steps):
        t = time.perf_counter()
        losses.append(trainer.train_step(next(it)))
        step_s.append(time.perf_counter() - t)
    it.close()
    return {"stage": "split", "protocol_auto": protocol, "arms": [a.name for a in plan.arms], "recipe": arm.recipe,
            "folds": 1, "counts": counts, "plan_s": plan_s, "trainer_setup_s": setup_s,
            "steps_per_epoch": trainer.steps_per_epoch, "batch_size": cfg.schedule.batch_size,
            "img_size": cfg.model.img_size, "steps": args.steps, "step_s": step_s, "losses": losses,
            "images": args.steps * cfg.schedule.batch_size, "inputs": "real cache, real labels, random init"}


def stage_loader(cache, args) -> dict:
    """The training BatchLoader over the official training rows: throughput and RSS per batch."""
    from cxrvit.data.loader import BatchLoader

    _, train_rows, _ = _official(cache)
    targets = cache.labels(list(cache.meta["label_columns"]))
    loader = BatchLoader(cache, train_rows, targets, batch_size=args.batch, shuffle=True, seed=0, drop_last=True)
    n_batches = -(-args.images // args.batch)
    rss, seen, times = [rss_anon_kb()], 0, []
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        seen += len(batch.images)
        times.append(time.perf_counter() - t0)
        rss.append(rss_anon_kb())
        if i + 1 == n_batches:
            break
    wall = time.perf_counter() - t0
    half = len(times) // 2
    first = half * args.batch / times[half - 1]
    second = (len(times) - half) * args.batch / (times[-1] - times[half - 1])
    return {"stage": "loader", "images": seen, "batch": args.batch, "wall_s": wall, "img_per_s": seen / wall,
            "img_per_s_first_half": first, "img_per_s_second_half": second,
            "rss_anon_mb_start": rss[0] / 1024, "rss_anon_mb_after_first_batch": rss[1] / 1024,
            "rss_anon_mb_end": rss[-1] / 1024, "rss_anon_mb_max": max(rss) / 1024,
            "inputs": "real cache (shuffled official train_val rows)"}


def _real_features(cache, rows: np.ndarray, path: Path, threads: int) -> tuple[np.ndarray, float, bool]:
    """A short real feature pass: the ``probe-random`` recipe's frozen backbone (as ``cxrvit train --recipe
    probe-random`` builds it; ``improved`` runs the same ViT-S/16 at the same size, from its learned weights)
    over ``rows`` of the full cache, saved to ``path`` so that the two probe sizes fit on the same features.
    Returns (features, seconds, reused)."""
    import torch

    from cxrvit.data.preprocess import Preprocessing
    from cxrvit.model.vit import build_model
    from cxrvit.training.config import load_recipe
    from cxrvit.training.linear_probe import head_features

    if path.is_file():
        with np.load(path) as z:
            if np.array_equal(z["rows"], rows):
                return z["feats"], float(z["seconds"]), True
    cfg = load_recipe("probe-random")
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.engine.seed)
    model = build_model(cfg.model.arch, num_classes=len(cfg.data.labels), attention=cfg.model.attention,
                        pos_embed=cfg.model.pos_embed)
    t = time.perf_counter()
    feats = head_features(model, cache, rows, cfg.model.img_size, Preprocessing(size=cfg.model.img_size))
    seconds = time.perf_counter() - t
    np.savez(path, rows=rows, feats=feats, seconds=seconds)
    return feats, seconds, False


def stage_probe(cache, args) -> dict:
    """linear_probe.fit_linear_probe's arithmetic after feature extraction, as it runs it: the C search by
    cross-fitting (cross_fit_path), thresholds on the chosen C's out-of-fold probabilities, the final head.
    Rows: the first ``--rows`` official train_val rows, with their real labels and patients; features:
    a real pass over ``--feature-rows`` of them, repeated (np.resize) to every row."""
    from cxrvit.evaluation.metrics import auroc, tune_thresholds
    from cxrvit.training.config import load_recipe
    from cxrvit.training.linear_probe import cross_fit_path, fit_head

    cfg = load_recipe("probe-random")     # improved's probe settings are probe-random's (its base)
    labels, p = list(cfg.data.labels), cfg.probe
    _, train_rows, _ = _official(cache)
    rows = np.sort(train_rows)[: args.rows]
    base, feature_s, reused = _real_features(cache, rows[: args.feature_rows],
                                             Path(args.out).parent / f"probe-features-{args.feature_rows}.npz",
                                             args.threads)
    feats = np.resize(base, (len(rows), base.shape[1]))
    y = cache.labels(labels).astype(np.float64)[rows]
    k = p.cv_folds
    t0 = time.perf_counter()
    oofs = cross_fit_path(feats, rows, y, rows, feats, y, cache.patient_ids, p.c_grid, k, cfg.data.split_seed)
    search_s = time.perf_counter() - t0
    scores = [float(np.nanmean(auroc(y, oof))) for oof in oofs]
    best = int(np.nanargmax(scores))
    t = time.perf_counter()
    tune_thresholds(y, oofs[best])
    thr_s = time.perf_counter() - t
    t = time.perf_counter()
    fit_head(feats, y, p.c_grid[best])
    head_s = time.perf_counter() - t
    wall = time.perf_counter() - t0
    return {"stage": "probe", "rows": int(len(rows)), "dim": int(feats.shape[1]), "labels": len(labels), "folds": k,
            "c_grid": p.c_grid, "mean_auroc": scores, "search_s": search_s, "thresholds_s": thr_s,
            "final_head_s": head_s, "wall_s": wall, "img_per_s": len(rows) / wall,
            "feature_rows": args.feature_rows, "feature_pass_s": feature_s, "features_reused": reused,
            "inputs": f"first official train_val rows' real labels and patients; real CLS features of "
                      f"{args.feature_rows} of them (probe-random recipe, random init) repeated"}


def stage_eval(cache, args) -> dict:
    """cxrvit eval's scoring (score_predictions): F1/AUROC/AP, trivial F1, the patient bootstrap."""
    from cxrvit.evaluation.evaluate import score_predictions
    from cxrvit.evaluation.metrics import tune_thresholds
    from cxrvit.training.config import load_recipe

    labels = list(load_recipe("baseline").data.labels)
    _, _, test_rows = _official(cache)
    rows = np.sort(np.resize(test_rows, args.rows))
    y = cache.labels(labels).astype(np.float64)[rows]
    rng = np.random.default_rng(0)
    # Synthetic probabilities that rank positives higher (AUROC ~0.75), rounded to 1e-4 to create ties as
    # a real model's float32 outputs do.
    prob = np.round(1 / (1 + np.exp(-(rng.standard_normal(y.shape) + 1.0 * y - 2.0))), 4)
    thr = tune_thresholds(y, prob)
    t0 = time.perf_counter()
    res = score_predictions(y, prob, thr, np.asarray(cache.patient_ids)[rows], labels,
                            provenance={"rehearsal": True}, split="test", n_resamples=args.bootstrap)
    wall = time.perf_counter() - t0
    return {"stage": "eval", "rows": int(len(rows)), "patients": res.n_patients, "bootstrap": args.bootstrap,
            "wall_s": wall, "img_per_s": len(rows) / wall,
            "mean_auroc_scored": float(res.headline["mean_auroc_scored"].value),
            "inputs": "official test rows' real labels and patients; synthetic probabilities"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=("split", "loader", "probe", "eval"))
    ap.add_argument("cache")
    ap.add_argument("--plan", default="bench/arms/official.yaml")
    ap.add_argument("--out", default="/work/rehearsal/train-steps", help="split: the Trainer's run folder")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=6400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--feature-rows", type=int, default=512, help="probe: rows of the real feature pass")
    args = ap.parse_args(argv)
    from cxrvit.data.cache import CXRCache

    cache = CXRCache(args.cache)
    if args.rows is None:
        args.rows = {"probe": 86_524, "eval": 25_596}.get(args.stage, 0)
    result = globals()[f"stage_{args.stage}"](cache, args)
    result["rss_anon_mb_at_exit"] = rss_anon_kb() / 1024
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
