"""Train-step speed in one table: attention paths, MFU, MAE vs supervised (issue 13).

At one size and batch the script times, interleaved round by round so that load from other jobs
hits every variant alike (median of ``--repeats`` rounds, wall and process-CPU time):
- the supervised ViT-S/16 train step (forward + BCE + backward + fused AdamW, as the engine runs it)
  with ``model.attention`` forced to ``sdpa`` and to ``explicit``, in fp32 and under bf16 autocast
  (on a CPU without native bf16 the bf16 rows measure emulation: correctness, not speed);
- the MAE pre-training step (``make_inputs`` crop + masking, encoder on the visible tokens, decoder,
  norm-pix loss, backward, AdamW) with the fused AdamW ``cxrvit pretrain`` now uses and with the
  per-parameter AdamW it used before, and its img/s ratio to the supervised fp32 step;
- the same MAE step with the ``mae-small`` recipe's 2-block decoder;
- the forward pass alone (no_grad, fp32): what ``strategy: linear_probe`` (the main job) spends its time on;
- optionally (``--compile``) the supervised fp32 step through ``torch.compile``, with its compile time.
Every row runs on the kept heap the ``cxrvit`` command sets (``cxrvit.allocator``; ``bench/allocator.py``
compares it with glibc's default in separate processes). MFU is the model FLOP rate over the matmul ceiling measured on the model's own layer shapes
(``bench/model.py``'s ``ceiling``), by wall time and by CPU time. Every row also gets its FLOP per image
counted by ``torch.utils.flop_counter`` on one real step, so an img/s ratio can be read against the FLOP
ratio (the speed-up the arithmetic allows). ``--profile`` adds a ``torch.profiler`` table by operator
(self CPU time) for the supervised and the MAE step: where the time goes.

    .venv/bin/python bench/train_step.py                       # 128 px, batch 16: a few minutes on 2 cores
    .venv/bin/python bench/train_step.py --size 224 --batch 8 --no-bf16
    .venv/bin/python bench/train_step.py --no-bf16 --profile
"""
from __future__ import annotations

import os
import sys

# Keep bench/ itself off sys.path: a script here must never shadow a module of the same name.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import importlib.util
import statistics
import time

import torch
import torch.nn.functional as F

from cxrvit.allocator import keep_freed_memory
from cxrvit.model.vit import set_attention, vit_small
from cxrvit.ssl.config import load_pretrain_recipe
from cxrvit.engine.optim import param_groups
from cxrvit.ssl.pretrain import build_method


def _bench_model():
    """bench/model.py as a module (for its matmul ceiling and FLOP count), without putting bench/ on the path."""
    spec = importlib.util.spec_from_file_location("bench_model", os.path.join(_HERE, "model.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def supervised_step(size: int, batch: int, attention: str, bf16: bool, compiled: bool = False):
    torch.manual_seed(0)
    model = set_attention(vit_small(num_classes=15), attention).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch, 15)).float()
    net = torch.compile(model) if compiled else model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.binary_cross_entropy_with_logits(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def forward_pass(size: int, batch: int):
    """The linear probe's feature extraction: fp32 forward to the final-norm CLS token, no autograd."""
    torch.manual_seed(0)
    model = vit_small(num_classes=0).eval()
    x = torch.randn(batch, 3, size, size)

    def step():
        with torch.no_grad():
            model.forward_features(x)
    return step


def mae_step(size: int, batch: int, mask: float, fused: bool, attention: str = "auto", recipe: str = "mae"):
    torch.manual_seed(0)
    cfg = load_pretrain_recipe(recipe, [f"mae.size={size}", f"mae.mask_ratio={mask}"])
    method = set_attention(build_method(cfg), attention).train()
    opt = torch.optim.AdamW(param_groups(method, weight_decay=0.01), lr=1e-5, fused=fused)
    x = torch.rand(batch, 1, size, size)  # grey images in [0, 1], as the pre-training loader yields them

    def step():
        inputs = method.make_inputs(x, torch.Generator().manual_seed(0))
        loss, _ = method(*inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def flop_per_image(step, batch: int) -> float:
    """Floating-point operations of one real step (forward + backward; the optimizer's are negligible)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch


def profile_table(name: str, step, rows: int = 12) -> None:
    """Top operators of two steps by self CPU time, as a share of the step."""
    from torch.profiler import ProfilerActivity, profile
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n{name}: top operators by self CPU time ({total / 2e3:.0f} ms per step)\n")
    print("| operator | calls per step | self CPU ms per step | share |")
    print("|---|---:|---:|---:|")
    for e in events[:rows]:
        print(f"| `{e.key}` | {e.count / 2:.0f} | {e.self_cpu_time_total / 2e3:.1f} | "
              f"{100 * e.self_cpu_time_total / total:.1f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (median)")
    ap.add_argument("--mask", type=float, default=0.75)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16-autocast rows (slow where bf16 is emulated)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd supervised fp32 rows")
    ap.add_argument("--profile", action="store_true", help="add operator tables (torch.profiler) for both steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the cxrvit command does
    bm = _bench_model()
    s, b = args.size, args.batch

    variants = {}
    for dtype in ("fp32",) if args.no_bf16 else ("fp32", "bf16"):
        for attn in ("sdpa", "explicit"):
            variants[f"supervised {dtype} {attn}"] = supervised_step(s, b, attn, dtype == "bf16")
    # MAE: today's step (fused AdamW, attention "auto": explicit on CPU for its short visible-token
    # sequences), the same with SDPA forced, and the step before issue 13 (per-parameter AdamW, SDPA).
    variants["mae fp32 fused AdamW, auto attention (now)"] = mae_step(s, b, args.mask, fused=True)
    variants["mae fp32 fused AdamW, sdpa"] = mae_step(s, b, args.mask, fused=True, attention="sdpa")
    variants["mae fp32 per-param AdamW, sdpa (before)"] = mae_step(s, b, args.mask, fused=False, attention="sdpa")
    variants["mae-small (2-block decoder) fp32 fused AdamW, auto"] = mae_step(s, b, args.mask, fused=True,
                                                                             recipe="mae-small")
    variants["forward only fp32 (probe extraction)"] = forward_pass(s, b)
    if args.compile:
        step = supervised_step(s, b, "sdpa", False, compiled=True)
        t = time.perf_counter()
        step()  # first call traces and compiles
        print(f"torch.compile: first step (compile + run) {time.perf_counter() - t:.1f} s", flush=True)
        variants["supervised fp32 sdpa compiled"] = step

    flops = {k: flop_per_image(step, b) for k, step in variants.items()}  # also the warm-up:
    for step in variants.values():  # allocator, oneDNN primitive caches
        step()
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for r in range(args.repeats):
        for k, step in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
        print(f"round {r + 1}/{args.repeats} done", flush=True)

    ceil = {name: bm.ceiling(b, s, dt, 3)[0] for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    flop = b * bm.gflop_per_image(s, train=True)
    flop_fwd = b * bm.gflop_per_image(s, train=False)
    ref = "supervised fp32 sdpa"
    med_w = {k: statistics.median(v) for k, v in wall.items()}
    med_c = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"\n{bm.describe_machine(args.threads)}; torch {torch.__version__}, {args.threads} threads")
    from cxrvit.runtime import attention_path
    auto = attention_path(torch.device("cpu"), torch.float32)
    print(f"{s} px, batch {b}, mask {args.mask}; model.attention=auto picks {auto} for the supervised fp32 step "
          f"on CPU; matmul ceiling GFLOP/s (wall / per CPU-s): "
          f"fp32 {ceil['fp32'].wall:.0f} / {ceil['fp32'].cpu:.0f}, bf16 {ceil['bf16'].wall:.0f} / {ceil['bf16'].cpu:.0f}\n")
    print("| train step | img/s (wall) | img per CPU-s | vs supervised fp32 sdpa (wall / CPU) | GFLOP per image "
          "(FLOP ratio vs supervised) | MFU vs same-dtype ceiling (wall / CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in variants:
        dtype = "bf16" if " bf16 " in k else "fp32"
        f = flop_fwd if k.startswith("forward") else flop
        mfu = "" if k.startswith("mae") else (f"{100 * f / med_w[k] / ceil[dtype].wall:.0f}% / "
                                              f"{100 * f / med_c[k] / ceil[dtype].cpu:.0f}%")
        print(f"| {k} | {b / med_w[k]:.2f} | {b / med_c[k]:.2f} | {med_w[ref] / med_w[k]:.2f}x / "
              f"{med_c[ref] / med_c[k]:.2f}x | {flops[k] / 1e9:.1f} ({flops[ref] / flops[k]:.2f}x) | {mfu} |")
    if args.profile:
        profile_table("supervised fp32 (model.attention auto)", supervised_step(s, b, "auto", False))
        profile_table("mae fp32 fused AdamW (model.attention auto)", mae_step(s, b, args.mask, fused=True))
        profile_table("forward only fp32", forward_pass(s, b))


if __name__ == "__main__":
    main()
