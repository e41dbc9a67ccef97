"""bench/ddp_exit.py end to end with one launch of each way of ending: both 2-process gloo runs start, train and
tear down; the one ending through cxrvit's exit_process succeeds (the script exits 1 otherwise) and the table has
a row per way. How often the other way aborts is the benchmark's number (docs/training.md), not asserted here:
it is a race with the scheduler."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ddp_exit_bench_runs_both_ways():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "ddp_exit.py"), "--launches", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    rows = dict(re.findall(r"^\| (finalize|exit_process) \| 1 \| (\d) \|", run.stdout, re.M))
    assert set(rows) == {"finalize", "exit_process"} and rows["exit_process"] == "0"
