"""The CUDA path of cxrvit, checked: bf16 autocast, pinned-memory loading, DDP over NCCL (bench/gpu.sh's stages 3-4).

Subcommands (bench/gpu.sh runs them in this order; every one also runs on a CPU, which is how it is tested;
bench/gpu_summary.py writes the summary of what they leave)::

    python bench/cuda_check.py check --device cuda --data CACHE --json F
        bf16 autocast forward + backward of cxrvit's ViT matches fp32 on the same weights within a bound
        (logits, loss, gradient direction), the engine resolves ``precision: auto`` to bf16 on this device,
        the engine's BatchLoader pins its batches on CUDA and a non_blocking copy delivers them intact,
        pinned vs pageable host-to-device bandwidth.
    python -m torch.distributed.run --standalone --nproc_per_node=1 bench/cuda_check.py ddp --device cuda --json F
        a process group (NCCL on CUDA, gloo on CPU), an all_reduce, and a bf16 train step of the ViT wrapped in
        DistributedDataParallel whose gradients equal the unwrapped model's. (cxrvit's own engine does not
        create a process group for WORLD_SIZE=1, so ``torchrun --nproc_per_node=1 -m cxrvit train`` alone
        would not touch NCCL: this is the one-process NCCL check.)
    python bench/cuda_check.py plan --arms bench/arms/sample-cv2-gpu.yaml --out F --extra CACHE [--tiny]
        the arms file as bench/gpu.sh runs it: extra_data pointed at CACHE; with --tiny, CPU-sized overrides
        (vit_tiny, 32 px, 1 epoch) on the same arms and pre-training stages -- the dry run.

Exit status 1 when a check fails; the JSON says which.
"""
from __future__ import annotations

import os
import sys

# Keep bench/ itself off sys.path: a script here must never shadow a module of the same name.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# bf16 has an 8-bit mantissa (~3 significant digits); through 12 pre-norm blocks the logits of a
# random-init ViT-S move by ~1% of their range. The bounds leave room for that and catch real breakage
# (a wrong dtype cast, autocast not applied, a kernel returning garbage), which moves them by O(1).
# DDP on one process averages over one rank, so its gradients equal the plain model's up to kernel
# non-determinism (deterministic kernels are requested; the bound allows a bf16 rounding step anyway).
BOUNDS = {"logit_rel": 0.05, "loss_rel": 0.02, "grad_cos": 0.98, "ddp_grad_rel": 1e-2}

# --------------------------------------------------------------------------- check


def env_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device), "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available()
                    else None)
    return info


def _step(model, x, y, bf16: bool):
    """One forward + backward; (logits as fp32, loss, flat gradient, logits dtype under autocast)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    loss.backward()
    grad = torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach().float(), loss.item(), grad, logits.dtype


def check_autocast(device: torch.device, arch: str, size: int, batch: int) -> dict:
    from cxrvit.model.vit import build_model
    from cxrvit.runtime import autocast_dtype

    torch.manual_seed(0)
    model = build_model(arch, num_classes=15).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 2, (batch, 15), device=device).float()
    l32, loss32, g32, _ = _step(model, x, y, bf16=False)
    l16, loss16, g16, dtype16 = _step(model, x, y, bf16=True)
    engine = autocast_dtype("auto", device)
    res = {
        "arch": arch, "size": size, "batch": batch,
        "engine_auto_precision": str(engine).replace("torch.", "") if engine is not None else "fp32",
        "autocast_logits_dtype": str(dtype16).replace("torch.", ""),
        "logit_max_abs_diff": (l16 - l32).abs().max().item(),
        "logit_rel": ((l16 - l32).abs().max() / l32.abs().max().clamp_min(1e-12)).item(),
        "loss_fp32": loss32, "loss_bf16": loss16, "loss_rel": abs(loss16 - loss32) / max(abs(loss32), 1e-12),
        "grad_cos": F.cosine_similarity(g16.double(), g32.double(), dim=0).item(),
        "finite": bool(torch.isfinite(l16).all() and torch.isfinite(g16).all()),
    }
    res["ok"] = bool(res["finite"] and res["autocast_logits_dtype"] == "bfloat16"
                     and res["logit_rel"] <= BOUNDS["logit_rel"] and res["loss_rel"] <= BOUNDS["loss_rel"]
                     and res["grad_cos"] >= BOUNDS["grad_cos"]
                     and (device.type != "cuda" or res["engine_auto_precision"] == "bfloat16"))
    return res


def _h2d_gbps(device: torch.device, pinned: bool, mib: int = 256) -> float:
    host = torch.empty(mib << 20, dtype=torch.uint8)
    if pinned:
        host = host.pin_memory()
    dev = torch.empty_like(host, device=device)
    dev.copy_(host, non_blocking=pinned)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dev.copy_(host, non_blocking=pinned)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return (mib << 20) / statistics.median(times) / 1e9


def check_loader(device: torch.device, data: str, batch: int) -> dict:
    """The engine's BatchLoader as the Trainer builds it (pin_memory left at its default)."""
    from cxrvit.data.cache import CXRCache
    from cxrvit.data.loader import BatchLoader

    cache = CXRCache(data)
    rows = np.arange(min(len(cache), 4 * batch))
    targets = cache.labels(["Atelectasis", "Effusion"]) if cache.labelled else None
    loader = BatchLoader(cache, rows, targets, batch_size=batch, shuffle=True, seed=0)
    first = next(iter(loader))
    try:
        pinned = bool(first.images.is_pinned())
    except RuntimeError:              # a torch build without any accelerator may refuse the question
        pinned = False
    moved = first.images.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    res = {"cache": data, "cache_size_px": int(cache.size), "images": len(cache), "batch": batch,
           "pin_memory_default": bool(loader.pin_memory), "batch_pinned": pinned,
           "non_blocking_copy_intact": bool(torch.equal(moved.cpu(), first.images))}
    want = device.type == "cuda"      # the engine pins exactly when CUDA is there
    res["ok"] = bool(res["non_blocking_copy_intact"] and res["pin_memory_default"] == want
                     and res["batch_pinned"] == want)
    if device.type == "cuda":
        res["h2d_pinned_gb_s"] = _h2d_gbps(device, pinned=True)
        res["h2d_pageable_gb_s"] = _h2d_gbps(device, pinned=False)
    return res


def cmd_check(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: torch.cuda.is_available() is False (torch {torch.__version__})")
        return 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = {"env": env_info(device), "bounds": BOUNDS,
           "autocast": check_autocast(device, args.arch, args.size, args.batch)}
    if args.data:
        out["loader"] = check_loader(device, args.data, args.loader_batch)
    out["ok"] = all(v["ok"] for k, v in out.items() if isinstance(v, dict) and "ok" in v)
    _emit(out, args.json)
    return 0 if out["ok"] else 1


# --------------------------------------------------------------------------- ddp


def cmd_ddp(args) -> int:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cxrvit.model.vit import build_model

    if "WORLD_SIZE" not in os.environ:
        print("ddp: run me under torchrun (python -m torch.distributed.run --standalone --nproc_per_node=1 ...)")
        return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.use_deterministic_algorithms(True, warn_only=True)   # as cxrvit's engine does on CUDA
    t0 = time.perf_counter()
    dist.init_process_group(backend)
    init_s = time.perf_counter() - t0
    try:
        t = torch.full((1,), float(rank + 1), device=device)
        dist.all_reduce(t)
        torch.manual_seed(0)
        model = build_model(args.arch, num_classes=15).to(device).train()
        ref = copy.deepcopy(model)
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        y = torch.randint(0, 2, (args.batch, 15), device=device).float()
        _, loss_ddp, g_ddp, _ = _step(ddp, x, y, bf16=True)     # gradients all-reduced (averaged) by DDP
        _, loss_ref, g_ref, _ = _step(ref, x, y, bf16=True)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, fused=device.type == "cuda")
        opt.step()                                              # the update runs on DDP's buckets' grads
        res = {"backend": dist.get_backend(), "world_size": world, "rank": rank, "device": str(device),
               "init_process_group_s": round(init_s, 2),
               "all_reduce": t.item(), "all_reduce_expected": world * (world + 1) / 2,
               "loss_ddp": loss_ddp, "loss_ref": loss_ref,
               "grad_rel": ((g_ddp - g_ref).abs().max() / g_ref.abs().max().clamp_min(1e-12)).item(),
               "params_finite": all(bool(torch.isfinite(p).all()) for p in ddp.parameters()),
               "bound_grad_rel": BOUNDS["ddp_grad_rel"],
               "env": env_info(device)}
        res["ok"] = bool(res["backend"] == backend and res["all_reduce"] == res["all_reduce_expected"]
                         and (world > 1 or res["grad_rel"] <= BOUNDS["ddp_grad_rel"]) and res["params_finite"])
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        _emit(res, args.json)
    return 0 if res["ok"] else 1


# --------------------------------------------------------------------------- plan


TINY = ["model.arch=vit_tiny", "model.img_size=32", "schedule.epochs=1", "schedule.batch_size=32",
        "optim.warmup_epochs=0.5", "eval.batch_size=128"]
TINY_PRETRAIN = ["model.arch=vit_tiny", "mae.size=32", "schedule.epochs=1", "schedule.batch_size=32",
                 "optim.warmup_epochs=0.5", "probe.every_epochs=1", "probe.size=32", "engine.log_every=5"]


def cmd_plan(args) -> int:
    import yaml

    plan = yaml.safe_load(Path(args.arms).read_text())
    for spec in (plan.get("pretrain") or {}).values():
        if spec.get("extra_data"):   # a stage that pre-trains on extra caches gets the dry run's; NIH-only stays so
            spec["extra_data"] = list(args.extra)
        if args.tiny:
            spec["overrides"] = list(TINY_PRETRAIN)
    if args.tiny:
        plan["overrides"] = list(TINY)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    head = f"# {'CPU dry run of' if args.tiny else 'as run from'} {args.arms}, written by bench/cuda_check.py plan\n"
    Path(args.out).write_text(head + yaml.safe_dump(plan, sort_keys=False))
    from cxrvit.experiments.plan import load_plan
    load_plan(args.out)        # every key known, arms and pre-training stages consistent
    print(f"wrote {args.out}")
    return 0


def _emit(obj: dict, path: str | None) -> None:
    text = json.dumps(obj, indent=2, default=str)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("check", "ddp"):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda")
        p.add_argument("--arch", default="vit_small")
        p.add_argument("--size", type=int, default=224)
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--json")
        if name == "check":
            p.add_argument("--data", help="a prepared cache: check the engine's loader on it")
            p.add_argument("--loader-batch", type=int, default=64)
    p = sub.add_parser("plan")
    p.add_argument("--arms", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--extra", nargs="*", default=[])
    p.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    return {"check": cmd_check, "ddp": cmd_ddp, "plan": cmd_plan}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
