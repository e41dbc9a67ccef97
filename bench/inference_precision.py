"""What fp32 scoring costs, and why scoring is not bf16: ViT-S/16 inference throughput and batch dependence.

For each size, times the eval-mode forward pass (no grad) of ViT-S/16 on a batch of real NIH images in
fp32 and under bf16 autocast, interleaved so that other jobs' load hits both alike, and measures how far
one image's probability moves when it is scored alone instead of inside the batch (max |delta p| over
images and labels). fp32 must stay under 1e-5 (the project's bound); bf16 shows what it would cost.

    .venv/bin/python bench/inference_precision.py --images ../shared/data/nih-sample/images --sizes 128 224
"""
from __future__ import annotations

import os
import sys

# Keep bench/ itself off sys.path: a script here must never shadow a module of the same name.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cxrvit.data.images import load_square
from cxrvit.data.preprocess import Preprocessing
from cxrvit.model.vit import build_model
from cxrvit.runtime import autocast, machine_description


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, required=True, help="folder of real CXR PNGs")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model("vit_small", num_classes=14).eval()
    files = sorted(args.images.glob("*.png"))[: args.batch]
    print(machine_description())
    print("| size | batch | fp32 img/s | bf16 img/s | bf16 speed vs fp32 | max |Δp| alone vs batch: fp32 | bf16 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        prep = Preprocessing(size=size)
        grey = torch.from_numpy(np.stack([load_square(f, size) for f in files])).unsqueeze(1)
        x = prep.normalize(grey.float() / 255)
        probs, times = {}, {"fp32": [], "bf16": []}
        with torch.no_grad():
            for precision in times:
                with autocast(x.device, precision):
                    model(x[:2])  # warm-up
            for _ in range(args.repeats):
                for precision in times:
                    t0 = time.perf_counter()
                    with autocast(x.device, precision):
                        probs[precision] = torch.sigmoid(model(x).float())
                    times[precision].append(time.perf_counter() - t0)
            drift = {}
            for precision in times:
                with autocast(x.device, precision):
                    alone = torch.cat([torch.sigmoid(model(x[i:i + 1]).float()) for i in range(len(x))])
                drift[precision] = (alone - probs[precision]).abs().max().item()
        rate = {p: len(x) / statistics.median(t) for p, t in times.items()}
        print(f"| {size} | {len(x)} | {rate['fp32']:.1f} | {rate['bf16']:.1f} | {rate['bf16'] / rate['fp32']:.2f}x "
              f"| {drift['fp32']:.1e} | {drift['bf16']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
