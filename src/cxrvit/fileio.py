"""Writing files so that a crash never leaves half of one, and JSON that has no NaN.

Every file cxrvit writes that a later step reads back (checkpoints, weights, bundles, fold
predictions, plans, exports) goes through :func:`atomic_write`: the bytes go to a temporary name
beside the target, then one ``os.replace`` (atomic on POSIX) puts them in place. A SIGKILL at any
moment leaves the previous file or the new one, never a torn one. What a SIGKILL *can* leave is the
temporary itself (a checkpoint's is hundreds of MB); the next write of the same file removes the
temporaries of processes that are gone (:func:`sweep_stale_temporaries`).

A writer is named ``<pid>@<host>`` (:func:`owner_tag`): a process id alone says nothing on a
filesystem that two machines share, where the other machine's processes cannot be seen. Only a
writer on this host is ever judged gone; another host's is left for a person to judge.
"""
from __future__ import annotations

import glob
import math
import os
import re
import socket
from pathlib import Path
from typing import Callable


def atomic_write(path: os.PathLike | str, write: Callable[[Path], object], *, fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it over ``path``.

    The temporary name keeps the target's suffix (``np.savez`` would otherwise append ``.npz``) and
    carries the writer (:func:`owner_tag`), so two workers writing the same file never share a temporary.
    ``fsync`` also forces the bytes to disk before the rename (checkpoints: survive a power cut too).
    """
    path = Path(path)
    sweep_stale_temporaries(path)
    tmp = path.with_name(f"{path.stem}.tmp{owner_tag()}{path.suffix}")
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

    Only names of :func:`atomic_write`'s form (``<stem>.tmp<writer><suffix>``) whose writer ran on this
    host and no longer runs are touched: a live worker's temporary, or another machine's, is left alone.
    """
    path = Path(path)
    prefix = f"{path.stem}.tmp"
    removed = []
    if not path.parent.is_dir():
        return removed
    for cand in path.parent.glob(f"{glob.escape(prefix)}*{glob.escape(path.suffix)}"):
        pid, host = parse_owner(cand.name[len(prefix):len(cand.name) - len(path.suffix)])
        if pid is not None and host == this_host() and pid != os.getpid() and not pid_alive(pid):
            cand.unlink(missing_ok=True)
            removed.append(cand)
    return removed


def this_host() -> str:
    """This machine's name as it may stand in a file name (anything but letters, digits, ``_`` and ``-``
    becomes ``_``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "localhost"


def owner_tag() -> str:
    """This process as a writer: ``<pid>@<host>``."""
    return f"{os.getpid()}@{this_host()}"


def parse_owner(tag: str) -> tuple[int | None, str]:
    """``(pid, host)`` of an :func:`owner_tag`; ``pid`` is None when ``tag`` is not one.

    A bare pid (what cxrvit wrote before hosts were recorded) is read as this host's.
    """
    pid, _, host = tag.strip().partition("@")
    if not pid.isdigit():
        return None, ""
    return int(pid), host or this_host()


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
