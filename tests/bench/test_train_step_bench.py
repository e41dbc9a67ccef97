"""bench/train_step.py end to end at a toy size: every row, the FLOP column and the profiler tables.

Its numbers are benchmarks (docs/history/benchmarks.md), not asserted here; what is asserted is that the script runs
with the package as it is (it once called a runtime helper with an argument the helper had dropped) and that
its FLOP counts say what the arithmetic says: the MAE step costs less than the supervised step per image,
the 2-block decoder less than the 4-block one, and a forward pass about a third of a train step (the backward
pass is two matmuls per forward matmul).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_step_bench_runs_and_counts_flops():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--size", "32", "--batch", "2",
                          "--repeats", "1", "--threads", "1", "--no-bf16", "--profile"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {}
    for line in run.stdout.splitlines():
        m = re.match(r"\| (supervised|mae|forward)([^|]*)\|.*\| ([\d.]+) \(([\d.]+)x\) \|", line)
        if m:
            rows[(m.group(1) + m.group(2)).strip()] = (float(m.group(3)), float(m.group(4)))
    assert {"supervised fp32 sdpa", "supervised fp32 explicit", "mae fp32 fused AdamW, sdpa",
            "mae-small (2-block decoder) fp32 fused AdamW, auto"} <= set(rows)
    assert rows["supervised fp32 sdpa"][1] == 1.0 and rows["supervised fp32 explicit"][1] == 1.0
    assert 1.0 < rows["mae fp32 fused AdamW, sdpa"][1] < rows["mae-small (2-block decoder) fp32 fused AdamW, auto"][1]
    assert 2.5 < rows["forward only fp32 (probe extraction)"][1] < 3.5
    assert run.stdout.count("top operators by self CPU time") == 3 and "aten::" in run.stdout
