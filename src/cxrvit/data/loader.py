"""Feed uint8 batches from a prepared cache: fast, deterministic, resumable, DDP-sharded.

The cache is already decoded, squared and resized, so a batch is one fancy-index into a
memory-mapped array (~4 MiB for 64 images at 256 px) and a copy into a torch tensor. That is
done here on a background thread a few batches ahead; crops, resizing and augmentation happen
later on the whole batch tensor (GPU when present), never per image in Python.

Order is a pure function of ``(seed, epoch)``, so a run resumed at batch ``b`` of epoch ``e``
(``set_epoch(e); iter_from(b)``) sees exactly the batches the interrupted run would have seen.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cxrvit.data.cache import CXRCache


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 1, S, S]
    targets: torch.Tensor | None  # float32 [B, K]
    rows: torch.Tensor  # int64 [B], cache rows


def resolve_targets(cache: CXRCache, targets) -> np.ndarray | None:
    """``targets``: label names (``["Atelectasis", "Mass/Nodule"]``), an ``[N_cache, K]`` array, or None."""
    if targets is None:
        return None
    if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        return cache.labels(targets)
    arr = np.asarray(targets, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != len(cache):
        raise ValueError(f"targets must be label names or an [N_cache={len(cache)}, K] array, got shape {arr.shape}")
    return arr


class CachedCXRDataset(Dataset):
    """Map-style dataset over cache ``rows``: ``(uint8 [1, S, S], float32 [K] multi-hot, metadata dict)``.

    For per-image access (inspection, evaluation of a few images, torch's DataLoader); training
    uses :class:`BatchLoader`, which avoids Python work per image.
    """

    def __init__(self, cache: CXRCache, rows=None, targets: Sequence[str] | np.ndarray | None = None):
        self.cache = cache
        self.rows = np.arange(len(cache), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.targets = resolve_targets(cache, targets)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        image = torch.from_numpy(np.array(self.cache.pixels[row], copy=True)).unsqueeze(0)
        target = torch.from_numpy(self.targets[row]) if self.targets is not None else torch.zeros(0)
        record = self.cache.index.iloc[row]
        meta = {"row": row, "image": record["image"], "patient_id": record["patient_id"], "view": record["view"]}
        return image, target, meta


class BatchLoader:
    """Batches of cache rows: ``for batch in loader`` gives :class:`Batch` objects.

    ``shuffle``: a new permutation per epoch, drawn from ``(seed, epoch)``.
    ``rank`` / ``world_size``: each rank gets a disjoint, equally long share of every epoch
    (the permutation is truncated, with ``drop_last``, or padded by wrapping, without it, to a
    multiple of ``world_size``, as ``DistributedSampler`` does).
    """

    def __init__(self, cache: CXRCache, rows, targets=None, batch_size: int = 64, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, rank: int = 0, world_size: int = 1,
                 prefetch: int = 3, pin_memory: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cache, self.rows = cache, np.asarray(rows, dtype=np.int64)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= len(cache)):
            raise ValueError(f"rows must lie in [0, {len(cache)})")
        self.targets = resolve_targets(cache, targets)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_rows(self) -> np.ndarray:
        """This rank's rows for the current epoch, in order (before batching)."""
        n = len(self.rows)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        if self.world_size > 1:
            if self.drop_last:
                order = order[: n - n % self.world_size]
            elif n % self.world_size:
                pad = self.world_size - n % self.world_size
                order = np.concatenate([order, np.resize(order, pad)])
            order = order[self.rank :: self.world_size]
        return self.rows[order]

    def __len__(self) -> int:
        n = len(self.epoch_rows())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batch_rows(self) -> list[np.ndarray]:
        rows = self.epoch_rows()
        stop = (len(rows) // self.batch_size) * self.batch_size if self.drop_last else len(rows)
        return [rows[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def _make(self, rows: np.ndarray) -> Batch:
        # Reading rows in ascending order is kinder to the page cache / disk; the batch keeps its order.
        order = np.argsort(rows, kind="stable")
        pixels = np.empty((len(rows), self.cache.size, self.cache.size), dtype=np.uint8)
        pixels[order] = self.cache.pixels[rows[order]]
        images = torch.from_numpy(pixels).unsqueeze(1)
        targets = torch.from_numpy(self.targets[rows]) if self.targets is not None else None
        if self.pin_memory:
            images = images.pin_memory()
            targets = targets.pin_memory() if targets is not None else None
        return Batch(images=images, targets=targets, rows=torch.from_numpy(rows.copy()))

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int = 0) -> Iterator[Batch]:
        """Batches ``start_batch, start_batch + 1, ...`` of the current epoch."""
        batches = self._batch_rows()[start_batch:]
        if self.prefetch <= 0:
            for rows in batches:
                yield self._make(rows)
            return
        yield from _prefetched(batches, self._make, self.prefetch)


def _prefetched(batches: list[np.ndarray], make, depth: int) -> Iterator[Batch]:
    """Build batches on a daemon thread, ``depth`` ahead; numpy's copy releases the GIL."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for rows in batches:
                if stop.is_set():
                    return
                q.put(make(rows))
            q.put(done)
        except BaseException as exc:  # hand the error to the consumer instead of dying silently
            q.put(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
