"""The C allocator under PyTorch's CPU tensors: keep freed memory instead of asking the kernel again.

Torch-free, so any layer may call it; glibc applies the setting to every allocation after the call, torch imported
or not (the ``cxrvit`` command calls :func:`keep_freed_memory` after parsing its arguments, before the command runs).
"""
from __future__ import annotations

import functools
import os
import platform

#: ``CXRVIT_MALLOC=system`` leaves the C allocator as the process found it.
MALLOC_ENV = "CXRVIT_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4   # glibc <malloc.h> mallopt() parameters


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Serve large tensors from a heap that keeps freed memory, instead of fresh pages every step.

    glibc's ``malloc`` hands a block above its mmap threshold (at most 32 MiB) to ``mmap`` and gives it
    back to the kernel on ``free``. A ViT-S/16 activation at 224 px and batch 64 is 77 MiB (the MLP
    hidden layer), so every pass asked the kernel for fresh zeroed pages again: ~10,000 page faults
    per image, paid inside whichever operator first touches the block (addmm's bias broadcast,
    ``copy_``, was 13 % of the 224-px forward pass in the operator profile). With mmap off and the trim
    threshold raised, freed blocks are reused and the resident set stays near its peak (docs/history/benchmarks.md,
    "Fresh pages at every step": 1.11-1.16x the img/s at 224 px / batch 64 for +1-21 % peak RSS).

    Process-wide and one-way (a heap once grown serves later blocks whatever the setting, which is why
    ``bench/allocator.py`` compares the two in fresh processes), so the ``cxrvit`` command calls it for its
    own process and a library user opts in. ``CXRVIT_MALLOC=system`` opts out. Returns True when the
    setting took (glibc on Linux only).
    """
    if os.environ.get(MALLOC_ENV, "").strip().lower() == "system" or platform.system() != "Linux":
        return False
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):        # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt takes a C int: keep up to 2 GiB of free heap before returning any to the kernel; never mmap.
    return mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
