"""Checkpoints: one file name, one resume rule, and the random state a bit-exact resume needs.

A run folder holds ``last.pt`` (:data:`LAST`), the newest checkpoint: a plain dict of tensors,
numbers, strings and lists, written with ``torch.save`` through :func:`cxrvit.fileio.atomic_write`
(temporary file, fsync, rename), so a SIGKILL at any moment leaves the previous checkpoint or the
new one, never a torn file. It is read back with ``weights_only=True``.

**The resume rule** (:func:`open_run`), the same for ``cxrvit train`` and ``cxrvit pretrain``:
resume is off by default. Without it, a folder that already holds ``last.pt`` is refused (never
overwritten, never silently continued); with it, the run continues from ``last.pt`` when there is
one and starts fresh when there is none, and a config that differs from the saved one is refused.

**Exact resume, one way**: everything random a step draws comes from generators whose state is in
the checkpoint - python, numpy and torch (CPU and CUDA), plus the loop's own generators - gathered
from *every* rank (``rng_ranks``), since ranks draw different drop-path masks and views. The data
order is a function of (seed, epoch), so nothing else is needed.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from cxrvit.fileio import atomic_write

LAST = "last.pt"
#: What ``cxrvit pretrain`` wrote before the engine was shared (issue 21); refused, see :func:`open_run`.
LEGACY_SSL_CHECKPOINT = "checkpoint.pt"


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


def open_run(out: Path, resume: bool, config: dict, free: Sequence[str] = (),
             parse: Callable[[dict, str], dict] | None = None) -> dict | None:
    """The checkpoint to continue from (None: start fresh), by the one resume rule above.

    ``config`` is the run's config as a dict; ``free`` names dotted keys (or whole sections) that may
    differ on resume because they do not change what is computed (e.g. ``engine.device``). ``parse(saved,
    source)`` reads the saved config as the loop's config class would (fields added since the run started
    take their defaults), so an older run still compares equal.
    """
    out = Path(out)
    last, legacy = out / LAST, out / LEGACY_SSL_CHECKPOINT
    if legacy.is_file() and not last.exists():
        raise ValueError(f"{legacy}: a checkpoint of the pre-training loop before the shared engine (issue 21), "
                         f"which kept no random state and cannot be resumed exactly; its backbone.safetensors, "
                         f"if written, is still usable. Pre-train again in a new folder (or delete {legacy})")
    if not last.exists():
        return None
    if not resume:
        raise FileExistsError(f"{out} already holds a run ({LAST}); pass resume=True (--resume) to continue it, "
                              f"or choose a new output folder")
    state = load_checkpoint(last)
    saved = parse(state["config"], str(last)) if parse is not None else state["config"]
    saved, now = _without(saved, free), _without(config, free)
    if saved != now:
        changed = sorted(k for k in set(_flat(saved)) | set(_flat(now)) if _flat(saved).get(k) != _flat(now).get(k))
        raise ValueError(f"{last}: the run was started with a different config ({', '.join(changed[:5])} differ); "
                         f"resume with the config in {out / 'config.yaml'}")
    return state


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _without(config: dict, free: Sequence[str]) -> dict:
    return {k: v for k, v in _flat(config).items() if not any(k == f or k.startswith(f + ".") for f in free)}


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Python, numpy, torch (CPU + CUDA) and ``generators``' states as weights_only-loadable values."""
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
    if generators:
        state["generators"] = {name: g.get_state() for name, g in generators.items()}
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        g.set_state(state["generators"][name])


def rng_for_rank(state: dict, rank: int, world_size: int) -> dict:
    """The generator state rank ``rank`` saved (``rng_ranks``), else rank 0's (``rng``).

    Ranks draw different drop-path masks (and, pre-training, different views), so each must get its
    own state back for a resumed DDP run to continue exactly. Checkpoints from before ``rng_ranks``
    existed, or written by a different number of processes, only have rank 0's to offer.
    """
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == world_size:
        return ranks[rank]
    return state["rng"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
