"""``cxrvit train``: choose the rows, then hand over to :func:`cxrvit.training.engine.train`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from cxrvit.training.config import FREE_ON_RESUME, RECIPES, config_from_dict, config_to_dict
from cxrvit.training.configparse import apply_overrides, parse_override

RUN_FILE = "run.json"   # how the run was launched: cache path, --init, recipe, overrides


def resumed_with(cfg, overrides: list[str], cfg_path: Path):
    """``cfg`` with ``--set`` applied on ``--resume``: only the keys :data:`FREE_ON_RESUME` names for its strategy
    (a probe's C grid and folds, refitted on the kept features); any other key is a ValueError naming it."""
    free = FREE_ON_RESUME.get(cfg.strategy, ())
    fixed = [key for key in (parse_override(item)[0] for item in overrides) if key not in free]
    if fixed:
        allowed = (f"a {cfg.strategy} run can change only {', '.join(free)} (its kept features do not depend on "
                   "them)" if free else f"a {cfg.strategy} run changes nothing")
        raise ValueError(f"the run continues with its saved config ({cfg_path}): {', '.join(fixed)} cannot change "
                         f"on resume; {allowed}; use a new --out for another run")
    return config_from_dict(apply_overrides(config_to_dict(cfg), overrides), source=f"{cfg_path} + --set")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a classifier on a prepared cache and write a model bundle",
        description="Train the DINO ViT-S/16 on a prepared cache. Under torchrun it runs DDP.")
    p.add_argument("--recipe", default=None, help=f"{', '.join(RECIPES)}, or a YAML file")
    p.add_argument("--data", default=None, help="prepared cache folder (cxrvit prepare)")
    p.add_argument("--out", default=None, help="run folder: checkpoints, logs, the final bundle")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 (repeatable); with --resume only a "
                        "probe's probe.c_grid / probe.cv_folds, refitted on its kept features")
    p.add_argument("--init", default=None, help="backbone checkpoint to start from (DINO/MAE/I-JEPA/timm/cxrvit)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue the run in RUN (or --out) from its last checkpoint, with its saved config")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: engine.device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(func=run_train)


def choose_rows(cache, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Official train_val -> patient-wise validation carve-out; without a split, carve from all rows.

    The official test rows are never returned: training must not see them, even as validation.
    """
    from cxrvit.data import splits

    has_split = ("official_split" in cache.index.columns
                 and cache.index["official_split"].isin(["train_val", "test"]).any())
    if has_split:
        rows, _test = splits.official_split(cache)
        how = f"official split: {len(rows)} train_val rows (test rows held out)"
    else:
        rows = np.arange(len(cache), dtype=np.int64)
        how = f"no official split in the cache: all {len(rows)} rows"
    train_rows, val_rows = splits.carve_validation(rows, cache.patient_ids, fraction=val_fraction, seed=seed)
    return np.asarray(train_rows), np.asarray(val_rows), how


def run_train(args: argparse.Namespace) -> int:
    from cxrvit.data.cache import CXRCache
    from cxrvit.training.config import load_recipe
    from cxrvit.training.engine import NonFiniteLossError, resolve_init, train

    import yaml

    resume = bool(args.resume)
    out = Path(args.resume if isinstance(args.resume, str) else (args.out or ""))
    if not str(out):
        print("cxrvit train: --out RUN is required (or --resume RUN)", file=sys.stderr)
        return 2
    launch = {}
    if resume:
        if args.recipe:
            print("cxrvit train --resume: the run continues with its saved config "
                  f"({out / 'config.yaml'}); drop --recipe", file=sys.stderr)
            return 2
        cfg_path = out / "config.yaml"
        if not cfg_path.is_file():
            print(f"cxrvit train --resume: {cfg_path} not found; is {out} a training run?", file=sys.stderr)
            return 2
        try:   # a hand-edited config.yaml or run.json: an error naming the file, as a bad recipe gives
            cfg = config_from_dict(yaml.safe_load(cfg_path.read_text()), source=str(cfg_path))
            if (out / RUN_FILE).is_file():
                launch = json.loads((out / RUN_FILE).read_text())
        except yaml.YAMLError as exc:
            print(f"cxrvit train --resume: {cfg_path}: not valid YAML: {exc}", file=sys.stderr)
            return 2
        except json.JSONDecodeError as exc:
            print(f"cxrvit train --resume: {out / RUN_FILE}: not valid JSON: {exc}", file=sys.stderr)
            return 2
        except (ValueError, OSError) as exc:
            print(f"cxrvit train --resume: {exc}", file=sys.stderr)
            return 2
        if args.overrides:
            try:
                cfg = resumed_with(cfg, args.overrides, cfg_path)
            except ValueError as exc:
                print(f"cxrvit train --resume: {exc}", file=sys.stderr)
                return 2
    else:
        if not args.recipe:
            print("cxrvit train: --recipe is required (baseline, improved or a YAML file)", file=sys.stderr)
            return 2
        try:
            cfg = load_recipe(args.recipe, args.overrides)
        except (ValueError, FileNotFoundError) as exc:
            print(f"cxrvit train: {exc}", file=sys.stderr)
            return 2
    data = args.data or launch.get("data")
    init = args.init or launch.get("init")
    if not data:
        print("cxrvit train: --data CACHE is required", file=sys.stderr)
        return 2
    try:
        resolve_init(cfg, init)          # a recipe's backbone file that is not here: refused before any writing
    except FileNotFoundError as exc:
        print(f"cxrvit train: {exc}", file=sys.stderr)
        return 2

    try:
        cache = CXRCache(data)
    except (OSError, RuntimeError, ValueError) as exc:  # absent, incomplete or unreadable cache
        print(f"cxrvit train: cannot open the cache {data}: {exc}", file=sys.stderr)
        return 2
    if not cache.meta.get("labelled", True):
        print(f"cxrvit train: {data} is an unlabelled cache; supervised training needs NIH labels", file=sys.stderr)
        return 2
    train_rows, val_rows, how = choose_rows(cache, cfg.data.val_fraction, cfg.data.split_seed)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        if cfg.strategy == "linear_probe":
            how += (f"; linear probe: frozen backbone, head and thresholds cross-fitted over all "
                    f"{len(train_rows) + len(val_rows)} training images ({cfg.probe.cv_folds} patient folds)")
        start = (f"--init {init}" if init else f"model.init {cfg.model.init}" if cfg.model.init
                 else f"{cfg.model.pos_embed} init, seed {cfg.engine.seed}")
        print(f"cxrvit train [{cfg.name}]: {how}; {len(train_rows)} train / {len(val_rows)} val images; "
              f"{len(cfg.data.labels)} labels; backbone from {start}; out {out}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            (out / RUN_FILE).write_text(json.dumps({
                "data": str(Path(data).resolve()), "init": str(Path(init).resolve()) if init else None,
                "recipe": args.recipe, "overrides": args.overrides}, indent=2))
    try:
        bundle = train(cfg, cache, train_rows, val_rows, out, init=init, device=args.device, resume=resume,
                       progress=not args.no_progress)
    except NonFiniteLossError as exc:
        print(f"cxrvit train: {exc}", file=sys.stderr)
        return 1
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"cxrvit train: {exc}", file=sys.stderr)
        return 2
    if main_rank:
        meta = json.loads((bundle / "bundle.json").read_text())
        if meta["training"].get("strategy") == "linear_probe":
            t = meta["training"]
            au = ", ".join(f"{k} {v:.3f}" for k, v in next(r["auroc"] for r in t["c_search"] if r["C"] == t["C"]).items()
                           if k in cfg.scored_labels and v is not None)
            print(f"bundle written to {bundle} (linear probe, C={t['C']:g}, {t['images']} images, "
                  f"{t['seconds']:.0f} s); out-of-fold AUROC: {au}; thresholds cross-fitted on the same images")
            return 0
        m = meta["training"]["val_metrics"]
        au = ", ".join(f"{k} {v:.3f}" for k, v in m["auroc"].items() if k in m["f1"] and v is not None)
        f1 = ", ".join(f"{k} {v:.3f}" for k, v in m["f1"].items() if v is not None)
        print(f"bundle written to {bundle} (best epoch {meta['training']['best_epoch']}); "
              f"validation AUROC: {au}; F1 at val-tuned thresholds: {f1}")
    return 0
