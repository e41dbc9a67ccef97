#!/usr/bin/env python
"""Benchmark: SSL pre-training (DINO / MAE / I-JEPA) + ``improved`` fine-tuning vs from scratch.

Patient-wise k-fold CV on a labelled cache; per fold each method pre-trains on the training
folds' images only (plus --extra unlabelled caches), then ``improved`` fine-tunes from it with the
same budget as the scratch ``improved`` and ``baseline`` arms. Prints the results table (also
written to OUT/results.md). Resumable: rerun the same command after an interruption.

    python bench/ssl_bench.py --data runs/cache-nih-128 --extra runs/cache-hannover-128 --out runs/bench-ssl \
        --folds 5 --methods dino mae ijepa --ssl-set schedule.epochs=100 --set schedule.epochs=30
"""
from __future__ import annotations

import sys
from pathlib import Path

import argparse
import shlex


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="labelled prepared cache")
    p.add_argument("--extra", nargs="*", default=[], help="extra unlabelled caches for pre-training only")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", nargs="+", default=["dino", "mae", "ijepa"], choices=["dino", "mae", "ijepa"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--set", dest="finetune", action="append", default=[], metavar="KEY=VALUE",
                   help="fine-tune overrides, applied to every arm (baseline, improved, SSL+improved)")
    p.add_argument("--ssl-set", dest="ssl", action="append", default=[], metavar="KEY=VALUE",
                   help="pre-training overrides for every method's recipe; METHOD:KEY=VALUE for one method only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    from cxrvit.ssl.bench import run_ssl_bench

    result = run_ssl_bench(args.data, args.out, methods=args.methods, folds=args.folds, ssl_overrides=args.ssl,
                           finetune_overrides=args.finetune, extra=args.extra, seed=args.seed,
                           n_resamples=args.bootstrap, device=args.device, probe=not args.no_probe,
                           command="python bench/ssl_bench.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)),
                           progress=args.progress, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(result.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
