"""Run one command and measure it: wall time, peak anonymous memory of its process tree, disk written.

Peak memory is the peak over time of the *sum* of ``RssAnon`` (from ``/proc/<pid>/status``) over
the child and all its descendants, sampled every ``interval`` seconds. ``RssAnon`` leaves out
file-backed pages: the prepared cache is a memory-mapped file, and its pages show up in RSS as
page cache that the kernel can drop, not as memory the process holds. ``ru_maxrss`` would count
them, and would give the largest single process, not the tree, so it is not used.

Disk written is ``write_bytes`` from ``/proc/<pid>/io`` summed over the tree (the last value seen
for each process; a process that exits between samples loses its last ~interval of writes, so
the figure is a lower bound for short-lived children).

    python bench/rehearsal/measure.py --json out.json [--kill-after-bytes N] -- cmd args...
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        kids = []
        for t in tasks:
            kids += [int(c) for c in (t / "children").read_text().split()]
        return kids
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _write_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def measure(cmd: list[str], interval: float = 0.25, kill_when=None, env=None, stdout=None, stderr=None) -> dict:
    """Run ``cmd``; ``kill_when(elapsed_s)`` returning True SIGKILLs the whole tree (a crash)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    peak_anon = peak_procs = 0
    written: dict[int, int] = {}
    killed = False
    while proc.poll() is None:
        tree = process_tree(proc.pid)
        anon = sum(_status_kb(p, "RssAnon") for p in tree)
        peak_anon, peak_procs = max(peak_anon, anon), max(peak_procs, len(tree))
        for p in tree:
            written[p] = max(written.get(p, 0), _write_bytes(p))
        if kill_when is not None and not killed and kill_when(time.perf_counter() - t0):
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: workers die with the parent, as in a crash
            killed = True
        time.sleep(interval)
    return {"cmd": cmd, "rc": proc.returncode, "wall_s": time.perf_counter() - t0, "peak_rss_anon_kb": peak_anon,
            "peak_processes": peak_procs, "write_bytes": sum(written.values()), "killed": killed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="where to write the measurement")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    result = measure(cmd)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), file=sys.stderr)
    return result["rc"]


if __name__ == "__main__":
    sys.exit(main())
