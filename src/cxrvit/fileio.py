"""Writing files so that a crash never leaves half of one, and JSON that has no NaN.

Every file cxrvit writes that a later step reads back (checkpoints, weights, bundles, fold
predictions, plans, exports) goes through :func:`atomic_write`: the bytes go to a temporary name
beside the target, then one ``os.replace`` (atomic on POSIX) puts them in place. A SIGKILL at any
moment leaves the previous file or the new one, never a torn one. What a SIGKILL *can* leave is the
temporary itself (a checkpoint's is hundreds of MB); the next write of the same file removes the
temporaries of processes that are gone (:func:`sweep_stale_temporaries`).

A writer is named ``<pid>@<host>`` (:func:`owner_tag`): a process id alone says nothing on a
filesystem that two machines share, where the other machine's processes cannot be seen. A writer on
this host is gone when its process is; another host's temporary is judged by its age instead (no
write takes an hour). A bare pid, as cxrvit named temporaries before it recorded hosts, is this host's.

:func:`exclusive_lock` is the one lock: held by the kernel (``flock``), so a killed holder releases
it at once, on any machine that shares the filesystem's locks.
"""
from __future__ import annotations

import glob
import math
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:   # Windows: exclusive_lock falls back to exclusive creation
    fcntl = None

#: A temporary of another host older than this is a killed writer's (a checkpoint is written in seconds).
STALE_AFTER_S = 3600.0


def _process_umask() -> int:
    mask = os.umask(0o022)   # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


#: The mode a plain ``open(path, "w")`` gives a new file here. Some writers (safetensors' ``save_file``,
#: ``tempfile``) create owner-only (0600) files; the renamed result gets this mode instead, so a model in a shared
#: run folder is readable by whoever may read the folder's other files.
FILE_MODE = 0o666 & ~_process_umask()


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
        os.chmod(tmp, FILE_MODE)
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

    Only names of :func:`atomic_write`'s form (``<stem>.tmp<writer><suffix>``) are touched: this host's
    when their process no longer runs, another host's once older than :data:`STALE_AFTER_S`. A live
    worker's temporary is left alone.
    """
    path = Path(path)
    prefix = f"{path.stem}.tmp"
    removed = []
    if not path.parent.is_dir():
        return removed
    for cand in path.parent.glob(f"{glob.escape(prefix)}*{glob.escape(path.suffix)}"):
        pid, host = parse_owner(cand.name[len(prefix):len(cand.name) - len(path.suffix)])
        if pid is None or (host == this_host() and pid == os.getpid()):
            continue
        try:
            gone = not pid_alive(pid) if host == this_host() else time.time() - cand.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:   # its writer finished meanwhile
            continue
        if gone:
            cand.unlink(missing_ok=True)
            removed.append(cand)
    return removed


class LockHeld(RuntimeError):
    """Another live process holds the lock; ``holder`` is its :func:`owner_tag` ("" if unknown)."""

    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"{path}: held by process {holder or '(unknown)'}")


@contextmanager
def exclusive_lock(path: os.PathLike | str) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` for the block, or raise :class:`LockHeld` at once.

    The file records its holder (:func:`owner_tag`) and is removed on exit. A file that a killed
    holder left is simply taken: the kernel dropped its lock with the process. Without ``fcntl``
    (Windows) the file's existence is the lock, and one left by a killed holder must be deleted by hand.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise LockHeld(path, path.read_text(errors="replace").strip()) from None
    else:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 256).decode(errors="replace").strip()
                os.close(fd)
                raise LockHeld(path, holder) from None
            # The holder before us removes the file on exit: if it did so between our open and our lock,
            # we hold a name nobody can find. Lock the file that is there now instead.
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
    os.write(fd, owner_tag().encode())
    try:
        yield path
    finally:
        if fcntl is None:              # Windows cannot remove a file that is still open
            os.close(fd)
            path.unlink(missing_ok=True)
        else:
            path.unlink(missing_ok=True)   # before closing: nobody can lock this file after we let it go
            os.close(fd)


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
    if not re.fullmatch(r"[1-9][0-9]*", pid, re.ASCII):
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
