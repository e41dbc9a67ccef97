"""Localisation of the explanation maps on NIH's radiologist boxes (pointing game, mass in box).

Usage::

    python bench/localization.py --model RUN/            # a trained bundle
    python bench/localization.py --random vit_small      # random weights: a method check only

For every image in ``--images`` that has boxes in ``BBox_List_2017.csv.gz``, the image goes
through the bundle's geometry, the three maps (last-block CLS attention, rollout, Grad-CAM for
the box's finding) are computed, and each box is scored against each map and against the
centre-of-image baseline. Prints a markdown table per finding; ``--csv`` keeps every record.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cxrvit.data import images
from cxrvit.data.nih import read_bbox_list
from cxrvit.data.preprocess import Preprocessing
from cxrvit.inference import heatmaps, localization as loc
from cxrvit.inference.bundle import Bundle, load_bundle
from cxrvit.labels import DEFAULT_LABELS
from cxrvit.model.vit import build_model

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-sample"
METHODS = ["attention", "rollout", "gradcam", "centre"]


def random_bundle(arch: str, size: int, seed: int) -> Bundle:
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=len(DEFAULT_LABELS)).eval()
    return Bundle(model=model, labels=list(DEFAULT_LABELS), thresholds={k: 0.5 for k in DEFAULT_LABELS},
                  preprocessing=Preprocessing(size=size), arch=arch)


def run(bundle: Bundle, image_dir: Path, boxes_path: Path, limit: int | None) -> list[loc.LocalizationRecord]:
    boxes = read_bbox_list(boxes_path)
    present = {p.name: p for p in image_dir.iterdir()}
    boxes = boxes[boxes.image.isin(present.keys())]
    names = sorted(boxes.image.unique())[:limit]
    size = bundle.preprocessing.size
    centre = loc.centre_baseline(size)
    device = next(bundle.model.parameters()).device
    records: list[loc.LocalizationRecord] = []
    for i, name in enumerate(names, 1):
        arr = images.read_grey(present[name])
        square = images.square_resize(arr, size)
        x = bundle.preprocessing.normalize(torch.from_numpy(square.copy())[None, None].to(device))
        heads = heatmaps.cls_attention(bundle.model, x)
        maps = {"attention": heatmaps.to_image(heads.mean(1), size)[0],
                "rollout": heatmaps.to_image(heatmaps.attention_rollout(bundle.model, x), size)[0],
                "centre": centre}
        cams: dict[str, np.ndarray] = {}
        for row in boxes[boxes.image == name].itertuples():
            box = loc.box_to_model(row.x, row.y, row.w, row.h, arr.shape, size)
            if row.finding in bundle.labels and row.finding not in cams:
                target = bundle.labels.index(row.finding)
                cams[row.finding] = heatmaps.to_image(heatmaps.grad_cam(bundle.model, x, target), size)[0]
            per_box = dict(maps, **({"gradcam": cams[row.finding]} if row.finding in cams else {}))
            for method, heat in per_box.items():
                records.append(loc.score_map(name, row.finding, method, heat, box))
        print(f"\r{i}/{len(names)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="trained model bundle folder")
    src.add_argument("--random", metavar="ARCH", help="random weights of ARCH (method check only)")
    ap.add_argument("--size", type=int, default=224, help="input size with --random (default 224)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=Path, default=DEFAULT_DATA / "images")
    ap.add_argument("--boxes", type=Path, default=DEFAULT_DATA / "BBox_List_2017.csv.gz")
    ap.add_argument("--limit", type=int, default=None, help="first N boxed images only")
    ap.add_argument("--csv", type=Path, help="write every (image, finding, method) record here")
    args = ap.parse_args(argv)

    bundle = load_bundle(args.model) if args.model else random_bundle(args.random, args.size, args.seed)
    what = (f"bundle {args.model}" if args.model
            else f"random-init {args.random}, seed {args.seed} (untrained model — method check only)")
    start = time.perf_counter()
    records = run(bundle, args.images, args.boxes, args.limit)
    elapsed = time.perf_counter() - start
    table = loc.summarize(records)
    n_images = len({r.image for r in records})
    n_boxes = sum(r.method == "centre" for r in records)  # every box is scored once per method
    print(f"model: {what}; input {bundle.preprocessing.size} px")
    print(f"images with boxes: {n_images}, boxes: {n_boxes}, {elapsed:.1f} s "
          f"({elapsed / max(1, n_images):.2f} s/image)\n")
    print("Pointing = share of boxes whose map maximum is inside the box; mass = mean share of the map's "
          "mass inside the box; box area = the mass a uniform map would give.\n")
    print(loc.markdown_table(table, METHODS))
    if args.csv:
        import pandas as pd

        pd.DataFrame([r.__dict__ for r in records]).to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
