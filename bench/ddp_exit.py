"""How often a finished 2-process gloo run aborts at exit, with and without ``exit_process``.

    python bench/ddp_exit.py [--launches 40]

Each launch is ``torchrun --standalone --nproc_per_node=2`` of this file as a worker: DDP on a small MLP, six
steps with an ``all_reduce``, a ``gather_object`` and a barrier (the collectives cxrvit's engine uses), then
``destroy_process_group``. The two ways of ending alternate launch by launch:

- ``finalize``: the worker returns and the interpreter finalizes (what ``raise SystemExit(code)`` does);
- ``exit_process``: :func:`cxrvit.engine.distributed.exit_process`, what ``cxrvit``'s entry point does in a
  worker of a multi-process launch.

A failed launch is torchrun's non-zero exit; the table counts those whose log holds "terminate called without
an active exception" (the abort ``exit_process`` is there for). The abort is a race with the scheduler: it is
more frequent when the cores are busy (run it beside other work to see it sooner).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

# Keep bench/ itself off sys.path: a script here must never shadow a module of the same name.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from cxrvit.engine.distributed import exit_process  # noqa: E402

ABORT = "terminate called without an active exception"
WAYS = ("finalize", "exit_process")


def worker(way: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(rank)
    for step in range(6):
        loss = net(torch.randn(4, 32, generator=g)).pow(2).mean()
        value = loss.detach().clone()
        dist.all_reduce(value)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 2 == 1:   # as Engine.save: every rank's generator state to rank 0, then a barrier
            dist.gather_object(g.get_state(), [None, None] if rank == 0 else None, dst=0)
            dist.barrier()
    dist.barrier()
    del net
    dist.destroy_process_group()
    if way == "exit_process":
        exit_process(0)


def launch(way: str, log_dir: str, i: int) -> tuple[bool, bool, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t = time.time()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.abspath(__file__), "--worker", way], env=env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        with open(os.path.join(log_dir, f"{way}-{i}.log"), "w") as f:
            f.write(done.stdout + done.stderr)
    return done.returncode != 0, ABORT in done.stderr, time.time() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=40, help="launches of each way (alternating)")
    ap.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    log_dir = tempfile.mkdtemp(prefix="ddp_exit-")
    counts = {w: [0, 0, 0.0] for w in WAYS}   # failed, aborted, seconds
    for i in range(args.launches):
        for way in WAYS:
            failed, aborted, seconds = launch(way, log_dir, i)
            c = counts[way]
            c[0], c[1], c[2] = c[0] + failed, c[1] + aborted, c[2] + seconds
        print(f"launch {i + 1}/{args.launches}: " + ", ".join(f"{w} {counts[w][0]} failed" for w in WAYS),
              file=sys.stderr, flush=True)
    print("\n| way of ending | launches | failed | of them the abort | s per launch |\n| --- | ---: | ---: | ---: | ---: |")
    for way in WAYS:
        failed, aborted, seconds = counts[way]
        print(f"| {way} | {args.launches} | {failed} | {aborted} | {seconds / args.launches:.1f} |")
    print(f"\nlogs of failed launches: {log_dir}")
    return 1 if counts["exit_process"][0] else 0


if __name__ == "__main__":
    raise SystemExit(main())
