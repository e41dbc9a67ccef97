"""``cxrvit pretrain``: self-supervised pre-training (DINO, MAE, I-JEPA) on one or more caches."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="self-supervised pre-training of the ViT-S/16 (dino, mae, ijepa)",
        description="Pre-train on the images of one or more prepared caches (labels ignored) and export "
                    "RUN/backbone.safetensors for `cxrvit train --init`. --resume continues RUN from RUN/last.pt. "
                    "Under torchrun it runs DDP.")
    p.add_argument("--method", required=True, choices=("dino", "mae", "ijepa"))
    p.add_argument("--data", required=True, nargs="+", metavar="CACHE", help="prepared caches (any mix, any sizes)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder: last.pt, metrics.jsonl, backbone")
    p.add_argument("--recipe", default=None,
                   help="shipped recipe (dino, mae, ijepa) or a YAML file; default: the method's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set schedule.epochs=50 (repeatable)")
    p.add_argument("--probe-cache", default=None, metavar="CACHE",
                   help="labelled cache for the k-NN / linear probes (default: the first labelled --data cache)")
    p.add_argument("--no-probe", action="store_true", help="no k-NN / linear-probe monitoring")
    p.add_argument("--include-test", action="store_true",
                   help="also pre-train on images NIH's official split puts in test (off: they stay unseen)")
    # The engine's one resume rule (cxrvit.engine.checkpoint.open_run), as `cxrvit train`'s: off by default.
    p.add_argument("--resume", action="store_true",
                   help="continue RUN from RUN/last.pt (same config up to device, logging, max_steps, probes); "
                        "without it a RUN that holds last.pt is refused")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="the default: start fresh (a RUN that already holds last.pt is refused, never overwritten)")
    p.add_argument("--init", default=None, metavar="LAST_PT",
                   help="continue an earlier pre-training: start from its RUN/last.pt (same method and model; "
                        "optimizer and schedules start fresh, --set schedule.epochs counts the epochs added)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: engine.device)")
    p.add_argument("--half", default=None, metavar="FILE",
                   help="also write a float16 copy of the backbone to FILE (ViT-S/16: 43 MB; how the product's "
                        "shipped backbone is made, sample/README.md)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_pretrain)


def pretrain_rows(cache, include_test: bool) -> tuple[np.ndarray, str]:
    """All rows, minus NIH's official test images unless asked: they are the held-out set."""
    index = cache.index
    if include_test or "official_split" not in index.columns:
        return np.arange(len(cache), dtype=np.int64), "all images"
    test = (index["official_split"].astype(str) == "test").to_numpy()
    return np.nonzero(~test)[0].astype(np.int64), f"{int(test.sum())} official-test images left out"


def probe_rows(cache, seed: int = 0):
    """The probe's own patient-wise split inside NIH train_val (test images are never used)."""
    from cxrvit.data import splits

    rows, _ = pretrain_rows(cache, include_test=False)
    return splits.carve_validation(rows, cache.patient_ids, fraction=0.2, seed=seed)


def run_pretrain(args: argparse.Namespace) -> int:
    from cxrvit.data.cache import CXRCache
    from cxrvit.ssl.config import load_pretrain_recipe
    from cxrvit.ssl.encoder import write_half_copy
    from cxrvit.ssl.pretrain import pretrain
    from cxrvit.ssl.probe import ProbeSet

    args.quiet = args.quiet or int(os.environ.get("RANK", "0")) != 0   # torchrun: one rank talks
    overrides = list(args.overrides) + ([f"engine.device={args.device}"] if args.device else [])
    overrides += [f"init={args.init}"] if args.init else []
    try:
        cfg = load_pretrain_recipe(args.recipe or args.method, overrides, method=args.method)
        caches = [CXRCache(d) for d in args.data]
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"cxrvit pretrain: {exc}", file=sys.stderr)
        return 2
    rows = []
    for path, cache in zip(args.data, caches):
        r, how = pretrain_rows(cache, args.include_test)
        rows.append(r)
        if not args.quiet:
            print(f"{path}: {len(r)} images ({how}); labels ignored", file=sys.stderr)
    probe = None
    if not args.no_probe:
        labelled = [c for c in caches if c.labelled]
        probe_cache = CXRCache(args.probe_cache) if args.probe_cache else (labelled[0] if labelled else None)
        if probe_cache is None and not args.quiet:
            print("no labelled cache: pre-training without k-NN / linear probes", file=sys.stderr)
        elif probe_cache is not None:
            train_rows, val_rows = probe_rows(probe_cache, cfg.engine.seed)
            probe = ProbeSet(probe_cache, np.asarray(train_rows), np.asarray(val_rows))
    try:
        result = pretrain(cfg, caches, Path(args.out), rows=rows, probe=probe, resume=args.resume,
                          quiet=args.quiet)
    except (ValueError, FileExistsError, FloatingPointError) as exc:
        print(f"cxrvit pretrain: {exc}", file=sys.stderr)
        return 1
    if args.half:
        try:
            half = write_half_copy(result.backbone, args.half)
        except (OSError, ValueError) as exc:
            print(f"cxrvit pretrain: --half {args.half}: {exc} (the float32 backbone is kept: {result.backbone})",
                  file=sys.stderr)
            return 1
        if not args.quiet:
            print(f"float16 copy: {half} ({half.stat().st_size / 2**20:.1f} MiB)")
    if not args.quiet:
        print(f"{result.backbone} ({result.steps} steps): fine-tune with "
              f"`cxrvit train --recipe finetune --init {result.backbone} ...`, or read it out with the "
              f"linear probe: `--recipe improved`")
    return 0
