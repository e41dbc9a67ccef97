"""Train-step throughput through the real engine vs the bare model's train step (same batch).

For each (size, precision) the script times, interleaved so that load from other jobs hits both
alike:
- **bare**: ViT-S/16 forward + BCE + backward + fused AdamW on an already-normalised float batch;
- **engine**: ``Trainer.train_step`` of a recipe on real uint8 batches from ``BatchLoader`` (the
  loader's fetch, batched augmentation, normalisation, loss, clipping, EMA and the LR schedule
  all included),
and reports images/s and the engine/bare ratio (target >= 0.9).

    .venv/bin/python bench/engine.py --data /tmp/cache256                    # a few minutes on 2 cores
    .venv/bin/python bench/engine.py --data C --sizes 224 --precisions bf16 --write docs/history/benchmarks.md
"""
from __future__ import annotations

import os
import sys

# Keep bench/ itself off sys.path: a script here must never shadow a module of the same name.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cxrvit.allocator import keep_freed_memory
from cxrvit.data.cache import CXRCache
from cxrvit.model.vit import build_model
from cxrvit.engine import distributed as dist_
from cxrvit.engine.optim import param_groups
from cxrvit.training.commands import choose_rows
from cxrvit.training.config import load_recipe
from cxrvit.runtime import autocast_dtype, resolve_device
from cxrvit.training.engine import Trainer


def bare_step_fn(arch: str, size: int, batch: int, k: int, amp: torch.dtype | None, device: torch.device):
    model = build_model(arch, num_classes=k).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 0.05, 1.0), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, size, size, device=device)
    y = (torch.rand(batch, k, device=device) < 0.1).float()

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        F.binary_cross_entropy_with_logits(logits.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def engine_step_fn(recipe: str, cache, size: int, batch: int, precision: str, device: torch.device, out: Path):
    cfg = load_recipe(recipe, [f"model.img_size={size}", f"schedule.batch_size={batch}",
                               f"engine.precision={precision}", "engine.checkpoint_every=0", "schedule.epochs=50"])
    tr, va, _ = choose_rows(cache, cfg.data.val_fraction, cfg.data.split_seed)
    trainer = Trainer(cfg, cache, tr, va, out, None, dist_.DistContext(device=device), False, False)
    trainer.loader.set_epoch(0)
    it = iter(trainer.loader)

    def step():
        nonlocal it
        try:
            b = next(it)
        except StopIteration:
            it = iter(trainer.loader)
            b = next(it)
        trainer.train_step(b)
        trainer.progress.step += 1
    return step, len(cfg.data.labels)


def measure(args) -> list[dict]:
    device = resolve_device(args.device)
    cache = CXRCache(args.data)
    rows = []
    for size in args.sizes:
        for precision in args.precisions:
            amp = autocast_dtype(precision, device)
            with tempfile.TemporaryDirectory() as tmp:
                eng, k = engine_step_fn(args.recipe, cache, size, args.batch, precision, device, Path(tmp) / "run")
                bare = bare_step_fn("vit_small", size, args.batch, k, amp, device)
                eng(), bare()  # warm-up: allocator, kernels, the loader's first fetch
                t_bare, t_eng = [], []
                for _ in range(args.repeats):  # interleaved: other jobs' load hits both alike
                    for fn, sink in ((bare, t_bare), (eng, t_eng)):
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        fn()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        sink.append(time.perf_counter() - t0)
            b_ips, e_ips = args.batch / statistics.median(t_bare), args.batch / statistics.median(t_eng)
            row = {"size": size, "precision": precision, "batch": args.batch, "bare": b_ips, "engine": e_ips,
                   "ratio": e_ips / b_ips}
            print(f"{size:>4} {precision:>5}  bare {b_ips:7.2f} img/s  engine {e_ips:7.2f} img/s  ratio {row['ratio']:.2f}",
                  flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict], args, device: str) -> str:
    lines = [f"| size | precision | batch | bare model img/s | engine ({args.recipe}) img/s | engine / bare |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['precision']} | {r['batch']} | {r['bare']:.2f} | {r['engine']:.2f} | "
                     f"{r['ratio']:.2f} |")
    lines.append("")
    lines.append(f"Machine: {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; cache "
                 f"{args.data} ({CXRCache(args.data).size} px); median of {args.repeats} interleaved steps.")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="prepared cache (real images)")
    p.add_argument("--recipe", default="finetune")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 128])
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--write", default=None, help="append the table to this markdown file")
    args = p.parse_args()
    keep_freed_memory()  # as the cxrvit command does (cxrvit.allocator)
    dev = resolve_device(args.device)
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    rows = measure(args)
    text = table(rows, args, device)
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
