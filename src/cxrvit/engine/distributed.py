"""Single-device or DDP, decided by the environment torchrun sets up.

``torchrun --nproc_per_node=N -m cxrvit train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
the same command without torchrun runs on one device. gloo on CPU, NCCL on CUDA. Used by
supervised training and pre-training alike (through :class:`cxrvit.engine.core.Engine`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from cxrvit.runtime import resolve_device


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False     # we created the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def multi_process() -> bool:
    """True in a worker of a multi-process torchrun launch (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_pref: str | torch.device | None = "auto") -> DistContext:
    if not multi_process():
        return DistContext(device=resolve_device(device_pref))
    world = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns)


def cleanup(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process now with ``code``, skipping the interpreter's finalization (stdio flushed first).

    For torchrun workers once their command has returned. Why: in torch 2.13 ``destroy_process_group`` does not
    join gloo's worker threads, and the one that ran the last collective (a barrier holding the ``gather_object``
    before it) may not yet have dropped it when the interpreter finalizes. Dropping it frees tensors whose Python
    objects need the GIL; CPython ends a thread that asks for the GIL during finalization, which unwinds through
    a noexcept destructor: ``std::terminate``, SIGABRT ("terminate called without an active exception"), and
    torchrun reports a finished run as failed. It is a race with the scheduler: 6 of 40 launches on busy cores,
    none of 40 with this exit (``bench/ddp_exit.py``; the core dump's thread: ``~AsyncBarrierWork`` ->
    ``~AsyncGatherWork`` -> ``decref_pyobject`` -> ``take_gil``; docs/training.md). Everything a run writes is
    closed by the time its command returns.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def mean_across(ctx: DistContext, value: torch.Tensor) -> torch.Tensor:
    """Average a scalar tensor over ranks (identity on one process)."""
    if not ctx.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world_size


def gather_to_main(ctx: DistContext, obj) -> list | None:
    """Every rank's ``obj`` as a list in rank order on rank 0 (``None`` elsewhere); ``[obj]`` on one process."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def wrap_ddp(model: nn.Module, ctx: DistContext, broadcast_buffers: bool = True) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else itself.

    ``broadcast_buffers=False`` when the buffers are kept equal by their owner (DINO all-reduces its
    centre), so DDP does not overwrite them with rank 0's copy before every forward.
    """
    if not ctx.distributed:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                               broadcast_buffers=broadcast_buffers)
