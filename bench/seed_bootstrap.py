"""How often a paired 95 % CI excludes a true zero when seeds differ: patient-only vs crossed bootstrap.

Null simulations: arms A and B are equally good on average over seeds, but each seed's model of B is shifted by a
random amount (its pre-training's luck, sd ``--seed-sd`` in score units); three seeds stacked, as `bench arms` does.
A 95 % interval should exclude zero about 5 % of the time. Prints one row per seed sd:

    python bench/seed_bootstrap.py [--sims 100] [--seed-sd 0 0.2 0.5]

docs/evaluation.md ("Seeds are stacked") quotes its table.
"""
from __future__ import annotations

import argparse

import numpy as np

from cxrvit.evaluation.compare import paired_compare
from cxrvit.evaluation.metrics import auroc

LABELS = ["Atelectasis", "Effusion", "Mass/Nodule"]


def one(rng, sd: float, patients: int, images: int, seeds: int, resamples: int, sim: int):
    pid = np.repeat(np.arange(patients), images).astype(str)
    n = len(pid)
    y = (rng.random((n, 3)) < 0.25).astype(float)
    pa = [y * 0.8 + rng.normal(0, 1, (n, 3)) for _ in range(seeds)]
    pb = [y * (0.8 + rng.normal(0, sd)) + rng.normal(0, 1, (n, 3)) for _ in range(seeds)]
    yy, pids, groups = np.concatenate([y] * seeds), np.tile(pid, seeds), np.repeat(np.arange(seeds), n)
    a, b = np.concatenate(pa), np.concatenate(pb)
    spread = np.std([auroc(y, pb[s]).mean() - auroc(y, pa[s]).mean() for s in range(seeds)])
    out = []
    for g in (None, groups):
        e = paired_compare(yy, a, 0.5, b, 0.5, pids, LABELS, n_resamples=resamples, seed=sim, groups=g).diff_auroc["mean"]
        out.append(e.lo > 0 or e.hi < 0)
    return out, spread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=100)
    ap.add_argument("--seed-sd", type=float, nargs="+", default=[0.0, 0.2, 0.5])
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--resamples", type=int, default=200)
    args = ap.parse_args()
    print(f"{args.sims} null simulations each; {args.patients} patients x 2 images, 3 seeds stacked, "
          f"{args.resamples} resamples")
    print("| seed sd | seed-to-seed sd of Δ mean AUROC | CI excludes 0: patients only | patients x seeds |")
    print("| ---: | ---: | ---: | ---: |")
    for sd in args.seed_sd:
        rng = np.random.default_rng(1)
        rows = [one(rng, sd, args.patients, 2, 3, args.resamples, i) for i in range(args.sims)]
        fixed = np.mean([r[0][0] for r in rows])
        crossed = np.mean([r[0][1] for r in rows])
        spread = np.mean([r[1] for r in rows])
        print(f"| {sd:g} | {spread:.3f} | {100 * fixed:.0f} % | {100 * crossed:.0f} % |")


if __name__ == "__main__":
    main()
