"""Writing files so that a crash never leaves half of one, and JSON that has no NaN.

Every file cxrvit writes that a later step reads back (checkpoints, weights, bundles, fold
predictions, plans, exports) goes through :func:`atomic_write`: the bytes go to a temporary name
beside the target, then one ``os.replace`` (atomic on POSIX) puts them in place. A SIGKILL at any
moment leaves the previous file or the new one, never a torn one. What a SIGKILL *can* leave is the
temporary itself (a checkpoint's is hundreds of MB); the next write of the same file removes the
temporaries of processes that are gone (:func:`sweep_stale_temporaries`).
"""
from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import Callable


def atomic_write(path: os.PathLike | str, write: Callable[[Path], object], *, fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it over ``path``.

    The temporary name keeps the target's suffix (``np.savez`` would otherwise append ``.npz``) and
    carries the process id, so two workers writing the same file never share a temporary.
    ``fsync`` also forces the bytes to disk before the rename (checkpoints: survive a power cut too).
    """
    path = Path(path)
    sweep_stale_temporaries(path)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def sweep_stale_temporaries(path: os.PathLike | str) -> list[Path]:
    """Delete the temporaries that killed writers left beside ``path``; returns what was deleted.

    Only names of :func:`atomic_write`'s form (``<stem>.tmp<pid><suffix>``) whose process no longer
    runs are touched: a live worker's temporary (another process writing the same file) is left alone.
    """
    path = Path(path)
    prefix = f"{path.stem}.tmp"
    removed = []
    if not path.parent.is_dir():
        return removed
    for cand in path.parent.glob(f"{glob.escape(prefix)}*{glob.escape(path.suffix)}"):
        pid = cand.name[len(prefix):len(cand.name) - len(path.suffix)]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            cand.unlink(missing_ok=True)
            removed.append(cand)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def json_safe(obj):
    """JSON has no NaN or infinity: undefined numbers (the AUROC of a label absent from a split) become null.

    Recurses into dicts, lists and tuples; every other value is returned as it is.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
