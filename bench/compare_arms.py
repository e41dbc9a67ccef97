"""Paired comparison of two finished arms that live in different `cxrvit bench arms` OUT folders.

`cxrvit bench arms` pairs the arms of one plan. Two plans that share folds but not data (e.g. the same images
cached at 160 and at 224 px) cannot be one plan, because a plan runs on one cache; this script pools each arm's
held-out predictions over its folds (seed 0 unless told) and runs the same paired patient bootstrap
(`cxrvit.evaluation.compare.paired_compare`) the arms table uses. It refuses arms whose held-out rows differ.
A is the reference: every difference printed is B − A, as an arms table's Δ is arm − reference. ``--seeds 0 1 2``
stacks several seeds' predictions and resamples the seeds with the patients (the crossed bootstrap `bench arms`
uses), pairing seed s of A with seed s of B.

    python bench/compare_arms.py --data runs/sample-cache160 \
        runs/cv2-learned mae224-probe-avg runs/cv2-native224 mae224-probe-avg --names 160px native224
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cxrvit.data.cache import CXRCache
from cxrvit.evaluation.compare import paired_compare
from cxrvit.experiments.crossval import load_fold, pool


def pooled_arm(out: Path, arm: str, seed: int, folds: list[int] | None = None):
    """rows, probs, per-image thresholds and labels of one arm, pooled over its fold folders in ``out``
    (every ``fold*`` folder, or only ``folds``)."""
    folder = arm if seed == 0 else f"{arm}-seed{seed}"
    paths = (sorted(out.glob(f"fold*/{folder}/heldout.npz")) if folds is None
             else [out / f"fold{f}" / folder / "heldout.npz" for f in folds])
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"{missing[0]}: missing (is the arm finished on that fold?)")
    if not paths:
        raise SystemExit(f"{out}: no fold*/{folder}/heldout.npz (is the arm finished?)")
    folds = [load_fold(p)[0] for p in paths]
    labels = folds[0].labels
    rows, probs, thr = pool(folds, labels)
    return rows, probs, thr, labels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_a", type=Path)
    ap.add_argument("arm_a")
    ap.add_argument("out_b", type=Path)
    ap.add_argument("arm_b")
    ap.add_argument("--data", required=True, help="a cache holding the labels and patient IDs of the rows")
    ap.add_argument("--seed", type=int, default=0, help="which seed's folders to pool (default 0)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="stack these seeds' pooled predictions, as an arms table does, and resample the seeds with "
                         "the patients (seed s of A is paired with seed s of B); replaces --seed")
    ap.add_argument("--folds", type=int, nargs="+", default=None,
                    help="pool only these folds (default: every fold folder; e.g. an arm finished on fold 0 only)")
    ap.add_argument("--names", nargs=2, default=None, help="column names for A and B")
    ap.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    args = ap.parse_args(argv)
    cache = CXRCache(args.data)
    seeds = args.seeds or [args.seed]
    stacked = []
    for seed in seeds:
        ra, pa, ta, la = pooled_arm(args.out_a, args.arm_a, seed, args.folds)
        rb, pb, tb, lb = pooled_arm(args.out_b, args.arm_b, seed, args.folds)
        if not np.array_equal(ra, rb):
            raise SystemExit(f"{args.arm_a} ({args.out_a}) and {args.arm_b} ({args.out_b}) were scored on different "
                             f"images at seed {seed}: not the same folds")
        if la != lb or (stacked and la != stacked[0][3]):
            raise SystemExit(f"the two arms have different label heads: {la} vs {lb}")
        stacked.append((ra, (pa, ta), (pb, tb), la))
    rows = np.concatenate([s[0] for s in stacked])
    pa, ta = (np.concatenate([s[1][i] for s in stacked]) for i in (0, 1))
    pb, tb = (np.concatenate([s[2][i] for s in stacked]) for i in (0, 1))
    la = stacked[0][3]
    groups = np.repeat(np.asarray(seeds), [len(s[0]) for s in stacked]) if len(seeds) > 1 else None
    names = tuple(args.names or (f"{args.arm_a}@{args.out_a.name}", f"{args.arm_b}@{args.out_b.name}"))
    y = cache.labels(la)[rows]
    cmp = paired_compare(y, pa, ta, pb, tb, np.asarray(cache.patient_ids)[rows], la, names=names, groups=groups)
    print(cmp.markdown())
    if args.json:
        args.json.write_text(json.dumps(cmp.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
