"""How often each QC flag fires on real, ordinary frontal CXRs: the flags' false-positive rates.

Every image in the given folders is a correctly displayed frontal chest radiograph, so any flag on it is
a false alarm. For each model input size, runs exactly what ``cxrvit predict`` runs per file
(``load_for_model``: read, header and pixel QC) and counts flags by name.

    .venv/bin/python bench/qc_rates.py ../shared/data/nih-sample/images ../shared/data/other-cxr/hannover/png
"""
from __future__ import annotations

import os
import sys

# Keep bench/ itself off sys.path: a script here must never shadow a module of the same name.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
from collections import Counter
from pathlib import Path

from cxrvit.inference.predict import collect_inputs, load_for_model
from cxrvit.runtime import machine_description


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", type=Path, nargs="+")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    args = ap.parse_args()
    print(machine_description())
    print("| images | n | model input | images with any flag | flags (count) |")
    print("| --- | --- | --- | --- | --- |")
    for folder in args.folders:
        files = collect_inputs([folder])
        for size in args.sizes:
            counts, flagged = Counter(), 0
            for f in files:
                flags = load_for_model(f, size, fix_inverted=False).flags
                counts.update(flag.split(":", 1)[0] for flag in flags)
                flagged += bool(flags)
            detail = ", ".join(f"{k} {v} ({100 * v / len(files):.1f} %)" for k, v in counts.most_common()) or "none"
            print(f"| {folder} | {len(files)} | {size} px | {flagged} ({100 * flagged / len(files):.1f} %) | {detail} |",
                  flush=True)


if __name__ == "__main__":
    main()
