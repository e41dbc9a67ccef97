"""What the kept heap (``cxrvit.allocator``) is worth: glibc's default vs kept freed memory, side by side.

The allocator is process-wide and a heap once grown serves later blocks whatever the setting, so the two
cannot be compared inside one process. Each round runs one fresh child process per setting, alternating
(``system`` = glibc as the process finds it, what ``CXRVIT_MALLOC=system`` gives; ``keep`` = what the
``cxrvit`` command sets), and each child times ``--steps`` steps after ``--warmup`` untimed ones (the kept
heap settles over its first few steps). Per setting: median img/s over
the rounds, minor page faults per image, and the child's peak resident set.

Workloads: ``forward`` is the linear probe's feature extraction (fp32, no autograd: the main job's cost);
``train`` the supervised fp32 train step (forward, BCE, backward, fused AdamW; the ``baseline`` recipe's
shape at 224 px batch 64); ``mae`` the default ``mae`` recipe's pre-training step (4-block decoder) at mask 0.75.

    .venv/bin/python bench/allocator.py                                 # 224 px, batch 64: ~10 min on 2 cores
    .venv/bin/python bench/allocator.py --work forward --rounds 3
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json
import resource
import statistics
import subprocess
import time

MODES = ("system", "keep")
WORKLOADS = ("forward", "train", "mae")


def _train_step_module():
    """bench/train_step.py as a module (its step builders), without putting bench/ on the path."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_train_step", os.path.join(_HERE, "train_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def child(work: str, mode: str, size: int, batch: int, steps: int, warmup: int) -> dict:
    """Build the workload in this (fresh) process, run ``warmup`` steps, time ``steps`` steps."""
    from cxrvit.allocator import keep_freed_memory
    if mode == "keep":
        assert keep_freed_memory()   # before the model's tensors exist, as the cxrvit command does
    ts = _train_step_module()
    step = {"forward": lambda: ts.forward_pass(size, batch),
            "train": lambda: ts.supervised_step(size, batch, "auto", bf16=False),
            "mae": lambda: ts.mae_step(size, batch, mask=0.75, fused=True)}[work]()
    for _ in range(warmup):   # the kept heap settles over the first steps (blocks grow it before reuse)
        step()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"img_s": batch / statistics.median(times), "faults_per_img": (usage.ru_minflt - faults0) / steps / batch,
            "maxrss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--work", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=2, help="alternating process pairs per workload (median)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per child")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per child first")
    ap.add_argument("--child", nargs=2, metavar=("WORK", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.size, args.batch, args.steps, args.warmup)))
        return

    results = {(w, m): [] for w in args.work for m in MODES}
    for r in range(args.rounds):
        for work in args.work:
            for mode in MODES:
                env = {k: v for k, v in os.environ.items() if k != "CXRVIT_MALLOC"}
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--size", str(args.size),
                                      "--batch", str(args.batch), "--steps", str(args.steps),
                                      "--warmup", str(args.warmup), "--child", work, mode],
                                     capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    raise SystemExit(f"bench/allocator.py: the {work}/{mode} child process failed "
                                     f"(exit {out.returncode}):\n{out.stderr[-2000:]}")
                results[(work, mode)].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    from cxrvit.runtime import machine_description
    print(f"\n{machine_description()}; load average {os.getloadavg()[0]:.1f} at the end; {args.size} px, "
          f"batch {args.batch}, {args.rounds} alternating process pairs x {args.steps} timed steps "
          f"after {args.warmup} warm-up\n")
    print("| workload | allocator | img/s (median) | kept vs system | minor page faults per image | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for work in args.work:
        med = {m: statistics.median(x["img_s"] for x in results[(work, m)]) for m in MODES}
        for mode in MODES:
            runs = results[(work, mode)]
            ratio = f"{med['keep'] / med['system']:.2f}x" if mode == "keep" else ""
            print(f"| {work} | {mode} | {med[mode]:.2f} | {ratio} | "
                  f"{statistics.median(x['faults_per_img'] for x in runs):.0f} | "
                  f"{max(x['maxrss_mib'] for x in runs):.0f} |")


if __name__ == "__main__":
    main()
