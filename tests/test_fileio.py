"""cxrvit.fileio: the one atomic writer and the one NaN -> null rule every saved file goes through."""
import json
import math
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import cxrvit.fileio as fileio
from cxrvit.fileio import (FILE_MODE, LockHeld, atomic_write, exclusive_lock, json_safe, owner_tag, parse_owner, pid_alive,
                           this_host)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "bundle.json"
    target.write_text("old")

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["bundle.json"]


def test_the_temporary_keeps_the_suffix_numpy_needs(tmp_path):
    target = tmp_path / "heldout.npz"
    atomic_write(target, lambda tmp: np.savez(tmp, rows=np.arange(3)), fsync=True)   # savez adds .npz otherwise
    assert np.load(target)["rows"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heldout.npz"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_write_removes_what_a_killed_writer_left_and_spares_a_live_one(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    dead, live = _dead_pid(), os.getppid()          # a finished child; the process that runs this test run
    assert not pid_alive(dead) and pid_alive(live)
    here = this_host()
    left = {f"last.tmp{dead}@{here}.pt": b"half of a checkpoint",            # SIGKILL during torch.save
            f"last.tmp{dead}.pt": b"the same, named before hosts were recorded",
            f"last.tmp{live}@{here}.pt": b"another worker, mid-write",
            f"last.tmp{dead}@{here}x.pt": b"a worker on another machine of a shared filesystem, mid-write",
            f"last.tmp{dead}@{here}y.pt": b"another machine's, killed two hours ago",
            f"other.tmp{dead}@{here}.pt": b"a different file's temporary"}
    for name, data in left.items():
        (tmp_path / name).write_bytes(data)
    two_hours_ago = time.time() - 2 * fileio.STALE_AFTER_S
    os.utime(tmp_path / f"last.tmp{dead}@{here}y.pt", (two_hours_ago, two_hours_ago))
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["last.pt", f"last.tmp{live}@{here}.pt", f"last.tmp{dead}@{here}x.pt", f"other.tmp{dead}@{here}.pt"])


def test_a_writer_is_named_by_process_and_host(monkeypatch):
    pid, host = parse_owner(owner_tag())
    assert pid == os.getpid() and host == this_host()
    assert parse_owner("123") == (123, this_host())               # a bare pid: written on this host
    assert parse_owner("123@gpu-node-7") == (123, "gpu-node-7")
    for not_a_writer in ("", "tmpfile", "0", "12a", "\u00b2", "-5"):
        assert parse_owner(not_a_writer) == (None, ""), not_a_writer
    monkeypatch.setattr(fileio.socket, "gethostname", lambda: "node7.example.org")
    assert this_host() == "node7_example_org"                   # a dot would read as a suffix in a file name
    monkeypatch.setattr(fileio.socket, "gethostname", lambda: "")
    assert this_host() == "localhost"


HOLD = """
import sys, time
from cxrvit.fileio import exclusive_lock
with exclusive_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_lock_is_refused_while_held_and_taken_once_its_holder_is_killed(tmp_path):
    lock = tmp_path / "stage" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as exc:
            with exclusive_lock(lock):
                pass
        assert exc.value.holder == f"{holder.pid}@{this_host()}" and str(lock) in str(exc.value)
    finally:
        holder.kill()                                            # SIGKILL: no exit code runs
        holder.wait()
    assert lock.exists()                                         # left behind by the killed holder...
    with exclusive_lock(lock):                                   # ...and taken: the kernel dropped its lock
        assert lock.read_text() == owner_tag()
    assert not lock.exists()


def test_json_safe_turns_every_non_finite_number_into_null():
    record = {"auroc": float("nan"), "loss": 0.5, "ci": [float("-inf"), 1.0], "nested": {"x": np.float64("nan")},
              "n": 3, "name": "Effusion", "none": None}
    out = json_safe(record)
    assert out == {"auroc": None, "loss": 0.5, "ci": [None, 1.0], "nested": {"x": None}, "n": 3, "name": "Effusion",
                   "none": None}
    json.dumps(out, allow_nan=False)
    assert not math.isnan(json_safe(1.5))


def test_without_fcntl_the_lock_is_the_file_and_a_leftover_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "fcntl", None)                  # as on Windows
    lock = tmp_path / ".lock"
    with exclusive_lock(lock):
        with pytest.raises(LockHeld) as exc:
            with exclusive_lock(lock):
                pass
        assert exc.value.holder == owner_tag()
    assert not lock.exists()
    lock.write_text("4242@elsewhere")                           # a killed holder's: only a person can judge it
    with pytest.raises(LockHeld, match="4242@elsewhere"):
        with exclusive_lock(lock):
            pass


def test_an_owner_only_temporary_gets_a_plain_file_mode(tmp_path):
    """safetensors' save_file creates 0600 files: the renamed result must get the mode open() would give,
    or other readers of a shared run folder cannot load the model."""
    import torch
    from safetensors.torch import save_file

    out = atomic_write(tmp_path / "model.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert stat.S_IMODE(out.stat().st_mode) == FILE_MODE == stat.S_IMODE(plain.stat().st_mode)
