"""``Engine``: what every cxrvit training loop shares, held together for one run.

A loop (``cxrvit.training.engine.Trainer``, ``cxrvit.ssl.pretrain.pretrain``) reads top to bottom
and calls, in order::

    engine = Engine(out, setup(device), precision, seed)  # device + DDP, autocast dtype, grad scaler
    state = engine.open(resume, config)                 # the one resume rule (checkpoint.open_run)
    ...build the model (same seed on every rank), load state["model"] when resuming...
    engine.build_optimizer(param_groups(model, wd), lr, betas)
    engine.start(state, generators)                     # restore optimizer + every rank's RNG, or seed
    log = engine.open_log(state, step)                  # metrics.jsonl, truncated to the checkpoint
    net = engine.wrap(model)                            # DDP when torchrun started several processes
    for each step:
        apply_schedule(engine.optimizer, warmup_cosine(step, ...))
        with engine.autocast(): loss = ...              # the method's own forward and loss
        engine.backward(loss); grad_norm = engine.step(params, clip)
        engine.save(the loop's state, generators)       # last.pt, atomically, every rank's RNG in it

What stays in the loop is what is its own: its data, its loss, its views and teacher, its
validation or probes, and what it exports.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from cxrvit.engine import checkpoint as ckpt
from cxrvit.engine.distributed import DistContext, barrier, gather_to_main, wrap_ddp
from cxrvit.engine.optim import build_adamw
from cxrvit.engine.runlog import RunLog
from cxrvit.runtime import PRECISION_NAMES, autocast, autocast_dtype


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


#: How :meth:`Engine.step` clips: the total norm of all gradients, or each parameter's gradient on its own.
CLIP_MODES = ("global", "per_param")


@torch.no_grad()
def clip_grad_per_param_(params: Iterable[torch.Tensor], clip: float) -> torch.Tensor:
    """DINO's ``utils.clip_gradients``: every gradient whose norm exceeds ``clip`` is scaled by
    ``clip / (norm + 1e-6)``, each parameter on its own; the others are left untouched. Returns the global
    norm of the gradients before clipping (what ``clip_grad_norm_`` returns), for the log."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch._foreach_norm(grads)   # one multi-tensor kernel, no host sync per parameter
    # min(coef, 1): multiplying by exactly 1.0 leaves a gradient bit-identical, as DINO's `if clip_coef < 1`.
    torch._foreach_mul_(grads, [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms])
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


class Engine:
    def __init__(self, out: Path, ctx: DistContext, precision: str, seed: int, deterministic: bool = False):
        self.out, self.ctx, self.device, self.seed = Path(out), ctx, ctx.device, seed
        # cxrvit.runtime's one rule: auto is bf16 where the hardware has it natively, fp16 on an older
        # GPU, else fp32. fp16's narrow exponent underflows small gradients, hence the loss scaling;
        # bf16 and fp32 need none (the scaler is then a no-op).
        self._set_precision(precision)
        self.optimizer: torch.optim.Optimizer | None = None
        if deterministic and self.device.type == "cuda":
            # CPU kernels are deterministic already. On CUDA, pick deterministic kernels but do not let
            # torch fill every new tensor with NaN (its default in this mode): that costs real time.
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = False

    def _set_precision(self, precision: str) -> None:
        self.amp = autocast_dtype(precision, self.device)
        self.precision = PRECISION_NAMES[self.amp]
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)

    @property
    def last(self) -> Path:
        return self.out / ckpt.LAST

    # -- set-up, in the order a loop calls it --------------------------------------------------
    def open(self, resume: bool, config: dict, free: Sequence[str] = (), parse=None) -> dict | None:
        """The checkpoint to continue from, or None (:func:`checkpoint.open_run`); then seed, so that every
        rank and every fresh start builds the same initial weights."""
        state = ckpt.open_run(self.out, resume, config, free, parse)
        started = (state or {}).get("precision")
        if started is not None and started != self.precision:
            # `auto` resolves once, when a run starts: a run resumed on another kind of machine (native bf16
            # or not) keeps the precision it started with, so it ends as it would have uninterrupted.
            # bf16 still runs without native support (emulated, slower); fp16 needs CUDA and says so.
            try:
                self._set_precision(started)
            except ValueError as err:
                raise ValueError(f"{self.last}: the run started in {started} on another device; {err}") from None
            if self.ctx.is_main:
                print(f"[engine] {self.last}: resuming in {started}, the precision this run started with "
                      f"(this device alone would choose another)")
        torch.manual_seed(self.seed)
        return state

    def build_optimizer(self, groups: list[dict], lr: float, betas, fused: bool = True) -> torch.optim.Optimizer:
        self.optimizer = build_adamw(groups, lr, betas, self.device, fused)
        return self.optimizer

    def wrap(self, model: nn.Module, compile: bool = False, broadcast_buffers: bool = True) -> nn.Module:
        """The module the loop calls: DDP across processes, compiled if asked; ``model`` keeps the weights."""
        net = wrap_ddp(model, self.ctx, broadcast_buffers)
        return torch.compile(net) if compile else net

    def start(self, state: dict | None, generators: dict[str, torch.Generator] | None = None) -> None:
        """Resume: optimizer, scaler and this rank's generators from ``state``. Fresh: seed every generator
        with (seed, rank), so ranks draw different drop-path masks and views."""
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            ckpt.restore_rng(ckpt.rng_for_rank(state, self.ctx.rank, self.ctx.world_size), generators)
            return
        ckpt.seed_everything(self.seed + self.ctx.rank)
        for g in (generators or {}).values():
            # From the seeded torch generator: a stream of its own, not a copy of the drop-path one.
            g.manual_seed(int(torch.randint(2**62, (1,))))

    def open_log(self, state: dict | None, step: int = 0, keep: Callable[[dict], bool] | None = None) -> RunLog:
        """``metrics.jsonl`` (rank 0 only); on resume, records after checkpoint step ``step`` are dropped, and
        those ``keep`` refuses (records the checkpoint does not cover although their step is its own)."""
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        return RunLog(self.out, enabled=self.ctx.is_main, resume_step=step if state is not None else None, keep=keep)

    # -- one optimizer step ---------------------------------------------------------------------
    def autocast(self):
        return autocast(self.device, self.precision)   # a no-op context for fp32

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the loss, scaled when fp16 needs it (the step unscales before clipping)."""
        self.scaler.scale(loss).backward()

    def step(self, params: Iterable[torch.Tensor], clip: float, measure: bool = False,
             clip_mode: str = "global") -> float | None:
        """Clip (``clip > 0``), step and clear the gradients; returns the (global, pre-clip) gradient norm when
        clipped or ``measure``d (None otherwise: measuring costs a pass over every gradient).

        ``clip_mode``: ``"global"`` scales all gradients together to a total norm of at most ``clip``
        (``clip_grad_norm_``: supervised training, MAE, I-JEPA); ``"per_param"`` clips each parameter's gradient
        to norm ``clip`` on its own (:func:`clip_grad_per_param_`: DINO's ``utils.clip_gradients``)."""
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
        norm = None
        if clip > 0 or measure:
            self.scaler.unscale_(self.optimizer)   # clip the true gradients, not the scaled ones
            params = list(params)
            if clip > 0 and clip_mode == "per_param":
                norm = float(clip_grad_per_param_(params, clip))
            else:
                norm = float(nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
        """Write ``last.pt`` (rank 0): ``state`` plus optimizer, scaler and every rank's generators.

        Every rank is at the same step and the weights are identical under DDP; the generators are not,
        so they are gathered into the file (``rng_ranks``; ``rng`` is rank 0's).
        """
        rng_ranks = gather_to_main(self.ctx, ckpt.capture_rng(generators))
        if self.ctx.is_main:
            ckpt.atomic_torch_save({**state, "precision": self.precision, "optimizer": self.optimizer.state_dict(),
                                    "scaler": self.scaler.state_dict(), "rng": rng_ranks[0],
                                    "rng_ranks": rng_ranks}, self.last)
        barrier(self.ctx)
