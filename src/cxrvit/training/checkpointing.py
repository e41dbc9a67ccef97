"""Atomic training checkpoints and the random-number state a bit-exact resume needs.

A checkpoint is a plain dict of tensors, numbers, strings and lists, written with ``torch.save``
to a temporary file in the run folder, flushed to disk, then renamed over the old one
(``os.replace`` is atomic on POSIX): a SIGKILL at any moment leaves either the previous
checkpoint or the new one, never a torn file. It is read back with ``weights_only=True``.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from cxrvit.fileio import atomic_write

LAST = "last.pt"


def atomic_torch_save(obj: dict, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp), fsync=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated/corrupt file, or one with pickled objects
        raise ValueError(f"{path}: not a readable cxrvit checkpoint ({type(exc).__name__}: {exc})") from exc


def capture_rng() -> dict:
    """Python, numpy and torch (CPU + CUDA) generator states as weights_only-loadable values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_for_rank(state: dict, rank: int, world_size: int) -> dict:
    """The generator state rank ``rank`` saved (``rng_ranks``), else rank 0's (``rng``).

    Ranks draw different drop-path masks, so each must get its own state back for a resumed DDP run
    to continue exactly. Checkpoints from before ``rng_ranks`` existed, or written by a different
    number of processes, only have rank 0's to offer.
    """
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == world_size:
        return ranks[rank]
    return state["rng"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
