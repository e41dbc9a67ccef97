"""Baseline vs improved recipe benchmark; the same as ``cxrvit bench recipes``.

    python bench/recipes.py --data CACHE [--folds 5] [--set k=v ...] [--out DIR] [--init CKPT]

See docs/evaluation.md for the documented CPU and GPU configurations.
"""
import sys

from cxrvit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "recipes", *sys.argv[1:]]))
