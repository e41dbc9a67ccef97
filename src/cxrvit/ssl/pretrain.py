"""Pre-training (DINO, MAE, I-JEPA) on the shared engine core (:mod:`cxrvit.engine`).

Device and DDP, precision and autocast, AdamW groups, the warm-up + cosine schedule, the optimizer
step, ``last.pt`` checkpoints (every ``checkpoint_every`` steps and at each epoch end), the resume
rule and ``metrics.jsonl`` are the engine's, the same as supervised training's. What is this loop's
own: the unlabelled images of several caches, the method (its views, loss and teacher), the weight-
decay and teacher-momentum schedules, the k-NN / linear probes, and the exported backbone.

Why a resume is exact: the data order is a function of (seed, epoch); every random draw of a step
comes from generators saved in the checkpoint for every rank: torch's (stochastic depth) and the
``views`` generator (crops, jitter, masks). The method's state (incl. EMA teacher and DINO's centre),
the optimizer and the step are the rest.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from cxrvit.data.preprocess import Preprocessing, resize_batch, to_float
from cxrvit.engine import distributed as dist_
from cxrvit.engine.checkpoint import load_checkpoint
from cxrvit.engine.core import Engine, NonFiniteLossError
from cxrvit.engine.optim import apply_schedule, param_groups, warmup_cosine
from cxrvit.model.vit import set_attention
from cxrvit.runtime import inference_precision
from cxrvit.ssl.config import NOT_THE_BACKBONE, PretrainConfig, config_from_dict, config_to_dict, save_config
from cxrvit.ssl.dino import DINO
from cxrvit.ssl.encoder import BACKBONE_FILE, build_encoder, export_backbone
from cxrvit.ssl.ijepa import IJEPA
from cxrvit.ssl.mae import MAE
from cxrvit.ssl.probe import ProbeSet, run_probes

#: Config keys a resume may change: where and how often it runs, the monitoring, and how far it goes (the
#: schedules span all ``schedule.epochs`` whatever ``max_steps`` says); nothing that is computed. ``init`` is
#: read at step 0 only (a resume starts from its own ``last.pt``), so a moved file does not block a resume.
RESUMABLE_CHANGES = NOT_THE_BACKBONE + ("schedule.max_steps", "init")

#: What :func:`pretrain`'s checkpoints say they are (``format``): the only files ``init`` accepts.
CHECKPOINT_FORMAT = "cxrvit-pretrain-checkpoint/1"
#: Config keys that must equal the ``init`` run's for its weights to mean the same thing here (the method's own
#: shapes, e.g. ``mae.size`` or the decoder's width, are checked by loading the weights).
SAME_AS_INIT = ("method", "model.arch", "model.depth", "model.patch_size")


def build_method(cfg: PretrainConfig) -> nn.Module:
    pre = Preprocessing(size=cfg.view_size)
    drop_path = cfg.dino.drop_path if cfg.method == "dino" else 0.0
    encoder = build_encoder(cfg.model.arch, cfg.model.depth, cfg.model.patch_size, drop_path)
    if cfg.method == "dino":
        method = DINO(encoder, cfg.dino, pre)
    elif cfg.method == "mae":
        method = MAE(encoder, cfg.mae, pre)
    else:
        method = IJEPA(encoder, cfg.ijepa, pre)
    # after construction, so the decoder's / predictor's / teacher's blocks follow the same setting
    return set_attention(method, cfg.model.attention)


# -- data: several caches, labels ignored ----------------------------------------------------------

class UnlabelledImages:
    """Images of one or more caches (any mix of sizes), sampled without labels.

    ``rows[i]`` restricts cache ``i`` (e.g. to the training folds); the epoch's order is a
    permutation seeded by (seed, epoch), sharded by rank, so every rank and every resume agrees.
    """

    def __init__(self, caches: Sequence, rows: Sequence[np.ndarray | None] | None = None, seed: int = 0):
        rows = list(rows) if rows is not None else [None] * len(caches)
        if len(rows) != len(caches):
            raise ValueError(f"{len(caches)} caches but {len(rows)} row selections")
        self.caches = list(caches)
        parts = []
        for i, (cache, r) in enumerate(zip(caches, rows)):
            r = np.arange(len(cache)) if r is None else np.asarray(r, dtype=np.int64)
            parts.append(np.stack([np.full(len(r), i), r], axis=1))
        self.entries = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.entries)

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self) // batch_size  # drop_last: every step sees a full batch

    def batch(self, epoch: int, index: int, batch_size: int, size: int, rank: int = 0, world: int = 1,
              device: torch.device | str = "cpu") -> torch.Tensor:
        """Float grey ``[b, 1, size, size]`` in [0, 1]: batch ``index`` of ``epoch``, this rank's share.

        Only uint8 pixels cross to the device; the resize to ``size`` happens there (GPU when present).
        """
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self), generator=gen).numpy()
        chosen = self.entries[order[index * batch_size:(index + 1) * batch_size]][rank::world]
        out = torch.empty(len(chosen), 1, size, size, device=device)
        for ci in np.unique(chosen[:, 0]):
            where = np.nonzero(chosen[:, 0] == ci)[0]
            rows = chosen[where, 1]
            sort = np.argsort(rows)
            pix = np.ascontiguousarray(self.caches[ci].pixels[rows[sort]])   # sorted reads of the memmap
            grey = torch.from_numpy(pix).unsqueeze(1).to(device, non_blocking=True)
            out[torch.from_numpy(where[sort]).to(device)] = resize_batch(to_float(grey), size)
        return out


@dataclass
class PretrainResult:
    out_dir: Path
    backbone: Path
    steps: int
    history: list[dict]
    seconds: float = 0.0   # wall time of the whole run, summed over the processes a resume stitched together


# -- the loop -------------------------------------------------------------------------------------

def load_init(method: nn.Module, cfg: PretrainConfig) -> int:
    """Load ``cfg.init`` (an earlier pre-training's ``last.pt``) into ``method``; returns the steps it had run.

    Refused, naming the file: another format, another method or model, or weights whose names or shapes
    differ (e.g. another ``mae.size``: the position table has another length)."""
    path = Path(cfg.init)
    if not path.is_file():
        raise ValueError(f"init {path}: no such file (continued pre-training starts from an earlier run's last.pt)")
    state = load_checkpoint(path)   # weights_only=True: a checkpoint is data, never code
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"init {path}: not a cxrvit pre-training checkpoint (format {state.get('format')!r}); "
                         f"init takes a pre-training run's last.pt")
    saved, mine = state.get("config") or {}, config_to_dict(cfg)
    for key in SAME_AS_INIT:
        theirs, ours = _dotted(saved, key), _dotted(mine, key)
        if theirs != ours:
            raise ValueError(f"init {path}: was pre-trained with {key} {theirs!r}, this run has {ours!r}; "
                             f"continued pre-training needs the same {', '.join(SAME_AS_INIT)}")
    try:
        method.load_state_dict(state["method"])
    except RuntimeError as exc:   # names/shapes: torch lists every mismatch
        raise ValueError(f"init {path}: its weights do not fit this {cfg.method} ({exc})") from None
    return int(state.get("step", 0))


def _dotted(d: dict, key: str):
    """``d["a"]["b"]`` for ``"a.b"``; None where a level is missing (a checkpoint from an older config)."""
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def pretrain(cfg: PretrainConfig, caches: Sequence, out_dir: os.PathLike | str, *,
             rows: Sequence[np.ndarray | None] | None = None, probe: ProbeSet | None = None,
             resume: bool = False, on_step: Callable[[int], None] | None = None,
             quiet: bool = False) -> PretrainResult:
    """Pre-train ``cfg.method`` on the images of ``caches`` and export ``out_dir/backbone.safetensors``.

    ``resume``: the engine's one rule (:func:`cxrvit.engine.checkpoint.open_run`): off, a folder holding
    ``last.pt`` is refused; on, the run continues from it (config equal up to :data:`RESUMABLE_CHANGES`)
    or starts fresh without one.
    """
    ctx = dist_.setup(cfg.engine.device)
    try:
        return _pretrain(cfg, caches, Path(out_dir), ctx, rows, probe, resume, on_step, quiet)
    finally:
        dist_.cleanup(ctx)


def _pretrain(cfg, caches, out: Path, ctx: dist_.DistContext, rows, probe, resume, on_step, quiet) -> PretrainResult:
    device, main = ctx.device, ctx.is_main
    started = time.time()
    say = (lambda *a: None) if quiet or not main else (lambda *a: print(*a, file=sys.stderr, flush=True))
    engine = Engine(out, ctx, cfg.engine.precision, cfg.engine.seed)

    data = UnlabelledImages(caches, rows, seed=cfg.engine.seed)
    bs = cfg.schedule.batch_size
    if bs % ctx.world_size:
        # Each rank takes every world-th image of the global batch: uneven shares would weigh images unequally
        # in the all-reduced mean. The supervised loop refuses it the same way.
        raise ValueError(f"schedule.batch_size={bs} is not divisible by the {ctx.world_size} processes; use a "
                         f"multiple of {ctx.world_size}")
    spe = data.batches_per_epoch(bs)
    if spe < 1:
        raise ValueError(f"{len(data)} images cannot fill one batch of {bs}; lower schedule.batch_size")
    total = spe * cfg.schedule.epochs
    last = min(total, cfg.schedule.max_steps) if cfg.schedule.max_steps > 0 else total
    source_size = cfg.engine.source_size or cfg.view_size

    state = engine.open(resume, config_to_dict(cfg), free=RESUMABLE_CHANGES,   # + identical init on every rank
                        parse=lambda saved, source: config_to_dict(config_from_dict(saved, source=source)))
    method = build_method(cfg).to(device)
    lr_base = cfg.optim.lr * bs / 256   # DINO's / MAE's rule: the recipe's lr is for a batch of 256
    engine.build_optimizer(param_groups(method, cfg.optim.weight_decay), lr_base, cfg.optim.betas)
    params = [p for g in engine.optimizer.param_groups for p in g["params"]]
    warmup = int(cfg.optim.warmup_epochs * spe)
    lr_at = lambda s: warmup_cosine(s, total, warmup, lr_base, cfg.optim.min_lr)  # noqa: E731
    wd_at = lambda s: warmup_cosine(s, total, 0, cfg.optim.weight_decay, cfg.optim.weight_decay_end)  # noqa: E731
    mom_at = None
    if method.momentum_base is not None:   # the teacher's EMA momentum, the method's own schedule (DINO, I-JEPA)
        mom_at = lambda s: method.momentum_at(s, total)  # noqa: E731
    # How `optim.clip_grad` clips, the method's class attribute: DINO per parameter; I-JEPA, and MAE (which declares
    # none), the global norm.
    clip_mode = method.clip_mode   # DINO clips each parameter's gradient, as its reference does
    views = {"views": torch.Generator()}   # crops, jitter, masks: one per rank, in every checkpoint

    step, history, seconds_before = 0, [], 0.0
    if state is not None:
        method.load_state_dict(state["method"])
        step, history = int(state["step"]), list(state["probes"])
        # A stage's cost is all of it: the earlier processes' time up to their last checkpoint (work done after
        # it is redone, and counted, here). Checkpoints written before this was kept count from the resume.
        seconds_before = float(state.get("seconds", 0.0))
        say(f"resumed {engine.last} at step {step}/{last}")
    elif cfg.init:
        say(f"continuing the pre-training of {cfg.init} ({load_init(method, cfg)} steps there) for {last} more steps")
    engine.start(state, views)
    # Decided from the checkpoint, which every rank read, so every rank agrees (save() is collective).
    final_probe_done = bool(history) and history[-1]["step"] == last
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    log = engine.open_log(state, step)
    # DINO all-reduces its centre itself; DDP must not overwrite it with rank 0's before each forward.
    net = engine.wrap(method, broadcast_buffers=False)

    def checkpoint() -> None:
        engine.save({"format": CHECKPOINT_FORMAT, "config": config_to_dict(cfg), "method": method.state_dict(),
                     "step": step, "probes": history, "seconds": seconds_before + time.time() - started}, views)

    def probe_now(epoch: int) -> None:
        if probe is None or not main:
            return
        t = time.time()
        # Monitoring must not change what training draws next (rank 0 alone probes; an extra probe where a
        # run was stopped must not make its continuation differ from an uninterrupted run).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            res = run_probes(method.export_encoder(), probe, cfg.probe.size, Preprocessing(size=cfg.probe.size),
                             cfg.probe.k, device, cfg.probe.batch_size,
                             bf16=inference_precision(device) == "bf16")  # a scoring pass: fp32
        rec = {"step": step, "epoch": epoch, "probe_seconds": round(time.time() - t, 1), **res}
        history.append(rec)
        log.write({"kind": "probe", **rec})
        say(f"probe @ epoch {epoch}: knn AUROC {res['knn_cls_auroc']:.3f} (cls) {res['knn_mean_auroc']:.3f} (mean), "
            f"linear {res['linear_cls_auroc']:.3f} (cls) {res['linear_mean_auroc']:.3f} (mean)")

    if step == 0 and probe is not None and cfg.probe.every_epochs > 0:
        probe_now(0)  # the random-init reference every later probe is read against
    method.train()
    t0, seen = time.time(), 0
    while step < last:
        epoch, index = divmod(step, spe)
        x = data.batch(epoch, index, bs, source_size, ctx.rank, ctx.world_size, device)
        inputs = method.make_inputs(x, views["views"])
        apply_schedule(engine.optimizer, lr_at(step), wd_at(step))
        with engine.autocast():
            loss, metrics = net(*inputs, **method.step_kwargs(step / spe))
        # Every rank decides on the same number: a rank that raised alone would leave the others waiting in
        # backward's all-reduce (the supervised loop does the same).
        loss_value = dist_.mean_across(ctx, loss.detach()).item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(f"{cfg.method} loss is {loss_value} at step {step}; lower optim.lr or raise "
                                     f"optim.warmup_epochs (last good checkpoint kept: {engine.last})")
        engine.backward(loss)
        method.after_backward(step / spe)
        grad_norm = engine.step(params, cfg.optim.clip_grad, measure=True, clip_mode=clip_mode)
        if mom_at is not None:
            method.after_step(mom_at(step))
        step += 1
        seen += len(x) * ctx.world_size
        if main and (step % cfg.engine.log_every == 0 or step == last):
            rate = seen / max(time.time() - t0, 1e-9)
            rec = {"kind": "train", "step": step, "epoch": round(step / spe, 3), "loss": loss_value,
                   "lr": lr_at(step - 1), "grad_norm": grad_norm, "images_per_s": round(rate, 2), **metrics}
            if mom_at is not None:
                rec["momentum"] = mom_at(step - 1)
            log.write(rec)
            extra = " ".join(f"{k} {v:.3g}" for k, v in metrics.items() if isinstance(v, float))
            say(f"[{cfg.method}] step {step}/{last} epoch {step / spe:.2f} loss {loss_value:.4f} "
                f"lr {lr_at(step - 1):.2e} {extra} {rate:.1f} img/s")
        epoch_end = step % spe == 0
        if epoch_end or (cfg.engine.checkpoint_every and step % cfg.engine.checkpoint_every == 0) or step == last:
            if epoch_end and step < last and cfg.probe.every_epochs > 0 and (step // spe) % cfg.probe.every_epochs == 0:
                probe_now(step // spe)
            checkpoint()
        if on_step is not None:
            on_step(step)
    if probe is not None and not final_probe_done:   # in-loop probes stop short of the last step
        probe_now(step // spe)
        checkpoint()
    log.close()
    seconds = seconds_before + time.time() - started
    backbone = out / BACKBONE_FILE
    if main:
        export_backbone(method.export_encoder(), backbone, arch=cfg.model.arch, method=cfg.method,
                        cls_token=method.cls_token_note, extra={"steps": step, "images": len(data)})
        (out / "pretrain.json").write_text(json.dumps({
            "method": cfg.method, "steps": step, "images": len(data), "backbone": BACKBONE_FILE,
            "precision": engine.precision, "device": str(device), "seconds": round(seconds, 1),
            "cls_token": method.cls_token_note, "probes": history}, indent=2))
    dist_.barrier(ctx)
    return PretrainResult(out, backbone, step, history, seconds)
