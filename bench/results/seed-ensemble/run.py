"""Exploratory, not an arm: do three pre-training seeds averaged beat three random backbones averaged?

Reads the held-out predictions `cxrvit bench arms` wrote for a three-seed plan (``OUT/fold<f>/<arm>[-seed<s>]/
heldout.npz``), averages each arm's probabilities over its seeds image by image, and compares two such ensembles
with cxrvit's paired patient bootstrap (evaluation.compare.paired_compare), pooled over folds. AUROC needs no
threshold. F1 is at the mean of the three seeds' cross-fitted thresholds, an approximation: the ensemble's own
out-of-fold predictions on the training images were not kept, so its thresholds cannot be tuned the product's way.

    python bench/results/seed-ensemble/run.py --data runs/sample-cache160 --out runs/cv2-tokavg-seeds \
        --a probe-random-avg --b mae224s-probe-avg
"""
import argparse
from pathlib import Path

import numpy as np

from cxrvit.data.cache import CXRCache
from cxrvit.evaluation import metrics as M
from cxrvit.evaluation.compare import paired_compare

SCORED = ("Atelectasis", "Effusion", "Mass/Nodule")


def ensemble(out: Path, arm: str, seeds) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    rows, probs, thr, labels = [], [], [], None
    for fold in sorted(out.glob("fold*")):
        runs = [np.load(fold / (arm if s == 0 else f"{arm}-seed{s}") / "heldout.npz") for s in seeds]
        if any((r["rows"] != runs[0]["rows"]).any() for r in runs):
            raise ValueError(f"{fold}: the seeds of {arm} hold out different rows")
        labels = [str(x) for x in runs[0]["labels"]]
        rows.append(runs[0]["rows"])
        probs.append(np.mean([r["probs"] for r in runs], axis=0))
        thr.append(np.broadcast_to(np.mean([r["thresholds"] for r in runs], axis=0), probs[-1].shape))
    return np.concatenate(rows), np.concatenate(probs), np.concatenate(thr), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--a", required=True, help="reference arm")
    ap.add_argument("--b", required=True, help="candidate arm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    cache = CXRCache(args.data)
    ra, pa, ta, labels = ensemble(args.out, args.a, args.seeds)
    rb, pb, tb, labels_b = ensemble(args.out, args.b, args.seeds)
    if labels != labels_b or (ra != rb).any():
        raise ValueError("the two arms were scored on different rows or labels")
    y = cache.labels(labels)[ra]
    idx = [labels.index(t) for t in SCORED]
    for name, p, t in ((args.a, pa, ta), (args.b, pb, tb)):
        au, f1 = M.auroc(y, p)[idx], M.f1_at(y, p, t)[idx]
        print(f"{name} ensemble of seeds {args.seeds}: mean AUROC {au.mean():.3f} {np.round(au, 3)}  "
              f"mean F1 {f1.mean():.3f} {np.round(f1, 3)}")
    cmp = paired_compare(y, pa, ta, pb, tb, cache.patient_ids[ra], labels, names=(args.a, args.b))
    for t in [*SCORED, "mean"]:
        d_au, d_f1 = cmp.diff_auroc[t], cmp.diff_f1[t]
        print(f"{t:>12}: B-A AUROC {d_au.value:+.3f} ({d_au.lo:+.3f} to {d_au.hi:+.3f})   "
              f"F1 {d_f1.value:+.3f} ({d_f1.lo:+.3f} to {d_f1.hi:+.3f})")
    print(f"{len(y)} images, {len(np.unique(cache.patient_ids[ra]))} patients; trivial F1 "
          f"{np.round(M.trivial_f1(y)[idx], 3)}")


if __name__ == "__main__":
    main()
