"""Device and precision choices, measured rather than assumed.

bf16 autocast is only a speed-up where the hardware has bf16 matrix instructions. On an x86 CPU
without ``avx512_bf16``/``amx_bf16`` oneDNN emulates bf16 and a ViT-S train step runs several times
*slower* than fp32 (measured: 2-core Xeon with AVX-512 but no avx512_bf16, bf16 matmul 18 GFLOP/s vs
fp32 89 GFLOP/s), so ``auto`` picks bf16 only where it pays.

``auto`` is a *training* choice. Scoring (the validation pass that tunes thresholds, ``eval``,
``predict``) always runs in fp32: under bf16 autocast oneDNN picks kernels by batch shape, so
one image's probability moved by up to 1e-3 with the batch it was scored in (measured on an AMD EPYC
with avx512_bf16), and a threshold tuned on one pass no longer matched the scores of another. See
:func:`inference_precision`.

``CXRVIT_FORCE_BF16=1`` makes this machine report native bf16 (``0`` reports none), so the bf16
code paths can be exercised on a CPU without it: ``CXRVIT_FORCE_BF16=1 pytest`` (slow: emulated).
"""
from __future__ import annotations

import functools
import os
import platform

import torch


FORCE_BF16_ENV = "CXRVIT_FORCE_BF16"


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions, or ``CXRVIT_FORCE_BF16`` says to act so."""
    forced = os.environ.get(FORCE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _cpu_advertises_bf16()


@functools.lru_cache(maxsize=1)
def _cpu_advertises_bf16() -> bool:
    """True when /proc/cpuinfo lists native bf16 matrix instructions (AVX512-BF16 or AMX-BF16)."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        try:
            with open("/proc/cpuinfo") as fh:
                return " bf16" in fh.read()
        except OSError:
            return False
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(pref: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """``auto``/None -> this rank's GPU if CUDA is available, else the CPU; ``cuda`` -> ``cuda:<local_rank>``.

    The one device rule of training, pre-training, scoring and the benchmarks; asking for CUDA on a
    machine without it is an error, not a silent CPU run.
    """
    pref = "auto" if pref is None else str(pref)
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(pref)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {pref!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``auto`` to ``bf16``/``fp16``/``fp32`` for ``device``; validate explicit choices."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


#: The autocast dtype (None: no autocast) by the name runs record for their training precision.
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None for fp32): the one precision chooser."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("engine.precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def inference_precision(device: torch.device) -> str:
    """The precision of every scoring pass (validation/threshold tuning, ``eval``, ``predict``): fp32.

    One image must get one probability whichever batch, command or machine scores it (1e-5, asserted
    by tests/inference/test_one_answer.py). fp32 kernels meet that; bf16 ones move a probability by up
    to 1e-3 with the batch around it, and a GPU-tuned threshold would not match a CPU ``predict``.
    Scoring is a small share of the work (one forward pass, no backward), so the price is small
    (docs/results.md, "Scoring precision"); training keeps ``auto``.
    """
    del device  # the same answer on every device is the point
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op context for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


#: Attention implementations a model can be set to (``model.attention``).
ATTENTION_PATHS = ("auto", "sdpa", "explicit")


def attention_path(device: torch.device, dtype: torch.dtype) -> str:
    """The faster attention kernel for ``auto``: ``explicit`` softmax for CPU bf16/fp16, else ``sdpa``.

    Measured with ``bench/model.py`` (ViT-S/16 train step, same weights): on a 2-core EPYC with native
    bf16, SDPA's fused CPU bf16 backward made the whole step up to 1.8x slower than the explicit
    ``softmax(q k^T) v`` (47.5 vs 86.8 img/s at 128 px); in fp32 the two are equal on CPU, and on
    CUDA the fused flash / memory-efficient kernels are the fast path, so SDPA stays the default.
    ``dtype`` is that of the queries, i.e. already the autocast dtype inside an autocast region.
    """
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return "explicit"
    return "sdpa"


def machine_description(device: str | torch.device | None = None) -> str:
    """One line naming the machine a number came from, for benchmark and results tables.

    The CPU always (cores, model, native bf16 or not); the GPU too when one is there and ``device`` is
    not the CPU.
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    bf16 = "native bf16" if cpu_has_fast_bf16() else "no native bf16"
    text = f"{os.cpu_count()}-core {cpu} ({bf16}), torch {torch.__version__}"
    if torch.cuda.is_available() and str(device or "auto") != "cpu":
        text += f", GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return text
