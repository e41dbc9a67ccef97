"""The work folder of an unfinished ``prepare`` run, and carrying finished rows over into new work.

While ``prepare`` runs, its work lives in ``CACHE/.partial/``: the pixels of every candidate image
(``pixels.u8``), a done-bitmap (``progress.bits``) that vouches only for rows whose pixels were
flushed before it was written, and the plan being executed (``plan.txt`` its key, ``plan.csv`` the
relative path of every row, ``plan.json`` its meta).

A row's pixels depend only on its image file, the size and the geometry rule, so decoded rows are
worth keeping when the plan changes: after a bad image is removed (as the error message advises),
or when a finished ``--skip-bad`` cache is rebuilt because a left-out image was repaired. Rows whose
relative path is still planned are *carried over* into the new work.

Crash safety: the old work folder is first renamed aside (``.partial-previous``, one atomic step);
rows are copied into the new work, flushed, and only then vouched for by its bitmap; the aside folder
is then renamed to a trash name (atomic again) and deleted. So the aside folder, while it exists, is
intact and holds everything the new work holds: a run that finds it throws the new work away and
carries from it again.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxrvit.data import images
from cxrvit.fileio import atomic_write

WORK, ASIDE, TRASH = ".partial", ".partial-previous", ".partial-trash"
PIXELS, PROGRESS = "pixels.u8", "progress.bits"
PLAN_KEY, PLAN_PATHS, PLAN_META = "plan.txt", "plan.csv", "plan.json"
#: The meta fields a row's pixels depend on: rows are carried only between plans that agree on all of them
#: (``source`` included, because a row is matched by its path relative to the data folder).
PIXEL_META = ("format", "size", "source", "geometry")


def write_file(path: Path, data: bytes | str) -> None:
    """Write-then-rename, synced: a reader (or a re-run after a crash) sees the old file or the new one."""
    payload = data.encode() if isinstance(data, str) else data
    atomic_write(path, lambda tmp: tmp.write_bytes(payload), fsync=True)


def save_progress(work: Path, pixels: np.memmap, done: np.ndarray) -> None:
    # Pixels first, then the bitmap that vouches for them: a row is never marked done before its bytes are on disk.
    pixels.flush()
    write_file(work / PROGRESS, np.packbits(done).tobytes())


def load_progress(work: Path, n: int) -> np.ndarray:
    """The done-bitmap of ``n`` rows; all False when there is none (or it is too short to be this plan's)."""
    bits = work / PROGRESS
    raw = bits.read_bytes() if bits.is_file() else b""
    if len(raw) * 8 < n:
        return np.zeros(n, dtype=bool)
    return np.unpackbits(np.frombuffer(raw, np.uint8), count=n).astype(bool)


def open_pixels(work: Path, n: int, side: int, done: np.ndarray) -> np.memmap:
    """The work's pixel file, created when missing or of the wrong size (then ``done`` is cleared: a new
    file vouches for nothing)."""
    path = work / PIXELS
    mode = "r+" if path.is_file() and path.stat().st_size == n * side * side else "w+"
    if mode == "w+":
        done[:] = False
    return np.memmap(path, dtype=np.uint8, mode=mode, shape=(n, side, side))


def work_key(work: Path) -> str | None:
    key = work / PLAN_KEY
    return key.read_text() if key.is_file() else None


def write_plan(work: Path, key: str, paths: list[str], meta: dict) -> None:
    """Record the plan in the work folder; the key last, so a key on disk always has its table beside it."""
    write_file(work / PLAN_PATHS, pd.DataFrame({"path": paths}).to_csv(index=False, lineterminator="\n"))
    write_file(work / PLAN_META, json.dumps(meta, sort_keys=True, indent=2) + "\n")
    write_file(work / PLAN_KEY, key)


@dataclass
class CarrySource:
    """Finished rows that may be copied into new work: ``pixels[i]`` holds ``paths[i]`` where ``done[i]``."""

    what: str  # for the log
    pixels: Path
    paths: list[str]
    done: np.ndarray


def work_source(folder: Path, meta: dict) -> CarrySource | None:
    """The finished rows of an unfinished run's work folder, or None when it can vouch for none that fit ``meta``."""
    try:
        old_meta = json.loads((folder / PLAN_META).read_text())
        paths = pd.read_csv(folder / PLAN_PATHS, dtype=str, keep_default_na=False)["path"].tolist()
    except (OSError, ValueError, KeyError):  # a folder from before plans were recorded, or a damaged one
        return None
    if any(old_meta.get(k) != meta.get(k) for k in PIXEL_META):
        return None
    side = int(meta["size"])
    pixels = folder / PIXELS
    if not (paths and pixels.is_file() and pixels.stat().st_size == len(paths) * side * side):
        return None
    done = load_progress(folder, len(paths))
    return CarrySource("an unfinished run made with other inputs", pixels, paths, done) if done.any() else None


def finished_source(root: Path, paths: list[str]) -> CarrySource:
    """Every row of a finished cache (its ``pixels.u8`` and the ``path`` column of its ``index.csv``)."""
    return CarrySource("the finished cache", root / PIXELS, list(paths), np.ones(len(paths), dtype=bool))


def carry_rows(source: CarrySource, paths: list[str], pixels: np.memmap, done: np.ndarray) -> int:
    """Copy the source's finished rows into the new work's rows with the same path; mark them done (in memory
    only: the caller saves progress, pixels first). Returns how many rows were carried."""
    side = pixels.shape[-1]
    src = np.memmap(source.pixels, dtype=np.uint8, mode="r", shape=(len(source.paths), side, side))
    row_of = {path: row for row, path in enumerate(source.paths) if source.done[row]}
    pairs = [(new, row_of[p]) for new, p in enumerate(paths) if not done[new] and p in row_of]
    for start in range(0, len(pairs), 1024):  # bounded memory: a full-size cache does not fit in RAM
        new_rows, old_rows = (np.asarray(c, dtype=np.int64) for c in zip(*pairs[start:start + 1024]))
        pixels[new_rows] = src[old_rows]
        done[new_rows] = True
    del src
    return len(pairs)


def open_work(out: Path, key: str, meta: dict, log: Callable[[str], None]) -> tuple[Path, CarrySource | None]:
    """Make ``out/.partial`` ready for the plan ``key``: resume it, or set an unfinished run made with other
    inputs aside to carry its rows from (returned), or discard one whose rows cannot fit this plan."""
    work, aside, trash = out / WORK, out / ASIDE, out / TRASH
    if trash.exists():
        shutil.rmtree(trash)  # a deletion that a crash interrupted
    if aside.is_dir():
        # A crash interrupted a carry-over: the aside folder is intact and the new work holds only copies of it.
        if work.is_dir():
            shutil.rmtree(work)
    elif work.is_dir() and work_key(work) != key:
        if work_source(work, meta) is not None:
            os.replace(work, aside)
        else:
            log(f"{out}: discarding an unfinished run made with other inputs (nothing in it fits this plan)")
            shutil.rmtree(work)
    source = work_source(aside, meta) if aside.is_dir() else None
    if aside.is_dir() and source is None:
        log(f"{out}: discarding an unfinished run made with other inputs (nothing in it fits this plan)")
        drop_aside(out)
    return work, source


def drop_aside(out: Path) -> None:
    """Delete the aside folder once the rows carried from it are safe: renamed away first, in one atomic step,
    so a crash during the deletion never leaves a damaged aside folder that a re-run would carry from."""
    if (out / ASIDE).is_dir():
        os.replace(out / ASIDE, out / TRASH)
        shutil.rmtree(out / TRASH)


# ---------------------------------------------------------------------------------------------
# Decoding into the work (runs in worker processes)


def decode_one(task: tuple[int, str, int]) -> tuple[int, bytes | None, str | None]:
    row, path, size = task
    try:
        return row, images.load_square(path, size).tobytes(), None
    except images.ImageReadError as exc:
        return row, None, exc.reason
    except Exception as exc:  # a worker must report, never die: the run has to list every bad file
        return row, None, f"{type(exc).__name__}: {exc}"


def decode_rows(paths: list[str], pixels: np.memmap, done: np.ndarray, work: Path, data: Path,
                workers: int | None, progress: bool, flush_seconds: float) -> list[tuple[int, str]]:
    """Decode every row not yet done into ``pixels``; return ``[(row, reason)]`` for failures."""
    size = pixels.shape[-1]
    tasks = [(int(r), str(data / paths[r]), size) for r in np.flatnonzero(~done)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    bar = tqdm(total=len(done), initial=int(done.sum()), unit="img", desc="prepare", disable=not progress,
               file=sys.stderr, smoothing=0.1, dynamic_ncols=True)
    bad: list[tuple[int, str]] = []
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    # Small chunks keep the bitmap fine-grained; large task lists amortise the pipe traffic.
    chunk = max(1, min(16, len(tasks) // (workers * 16)))
    results = pool.imap_unordered(decode_one, tasks, chunksize=chunk) if pool else map(decode_one, tasks)
    last = time.monotonic()
    try:
        for row, buf, reason in results:
            if buf is None:
                bad.append((row, reason))
            else:
                pixels[row] = np.frombuffer(buf, dtype=np.uint8).reshape(size, size)
                done[row] = True
            bar.update(1)
            if time.monotonic() - last > flush_seconds:
                save_progress(work, pixels, done)
                last = time.monotonic()
    finally:
        save_progress(work, pixels, done)  # also on Ctrl-C: every row marked done was written above
        bar.close()
        if pool:
            pool.terminate()
            pool.join()
    return bad
