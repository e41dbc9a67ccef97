"""The pre-training engine shared by DINO, MAE and I-JEPA.

One loop, the same guarantees as supervised training: bf16 autocast, AdamW with cosine lr / weight
decay / EMA-momentum schedules, atomic checkpoints every ``checkpoint_every`` steps and at each
epoch end, exact resume after a SIGKILL, torchrun/DDP, a progress line and ``log.jsonl``.

Why a resume is exact: the data order is a function of (seed, epoch), and every random draw of a
step (crops, masks, stochastic depth) comes from generators seeded with (seed, step, rank). So
nothing random has to be checkpointed: the method's state (incl. EMA teacher and DINO's centre),
the optimizer and the step number are the whole state.
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
import torch.distributed as dist
from torch import nn

from cxrvit.data.preprocess import Preprocessing
from cxrvit.runtime import autocast_dtype, inference_precision, resolve_device
from cxrvit.ssl.config import PretrainConfig, config_to_dict, save_config
from cxrvit.ssl.dino import DINO
from cxrvit.model.vit import set_attention
from cxrvit.ssl.encoder import BACKBONE_FILE, build_encoder, cosine_schedule, export_backbone
from cxrvit.ssl.ijepa import IJEPA
from cxrvit.ssl.mae import MAE
from cxrvit.ssl.probe import ProbeSet, run_probes
from cxrvit.ssl.views import to_unit
from cxrvit.training.checkpointing import atomic_torch_save, load_checkpoint

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"


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
            out[torch.from_numpy(where[sort]).to(device)] = to_unit(grey, size)
        return out


# -- helpers --------------------------------------------------------------------------------------

def param_groups(modules: list[nn.Module]) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and 1-d parameters (DINO's rule)."""
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


@dataclass
class PretrainResult:
    out_dir: Path
    backbone: Path
    steps: int
    history: list[dict]


# -- the loop -------------------------------------------------------------------------------------

def pretrain(cfg: PretrainConfig, caches: Sequence, out_dir: os.PathLike | str, *,
             rows: Sequence[np.ndarray | None] | None = None, probe: ProbeSet | None = None,
             resume: bool = True, on_step: Callable[[int], None] | None = None,
             quiet: bool = False) -> PretrainResult:
    """Pre-train ``cfg.method`` on the images of ``caches`` and export ``out_dir/backbone.safetensors``."""
    out = Path(out_dir)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = resolve_device(cfg.engine.device, int(os.environ.get("LOCAL_RANK", "0")))
    if distributed and device.type == "cuda":
        torch.cuda.set_device(device)
    main = rank == 0
    say = (lambda *a: None) if quiet or not main else (lambda *a: print(*a, file=sys.stderr, flush=True))

    data = UnlabelledImages(caches, rows, seed=cfg.engine.seed)
    bs = cfg.schedule.batch_size
    spe = data.batches_per_epoch(bs)
    if spe < 1:
        raise ValueError(f"{len(data)} images cannot fill one batch of {bs}; lower schedule.batch_size")
    total = spe * cfg.schedule.epochs
    last = min(total, cfg.schedule.max_steps) if cfg.schedule.max_steps > 0 else total
    source_size = cfg.engine.source_size or cfg.view_size

    torch.manual_seed(cfg.engine.seed)  # identical initial weights on every rank and every fresh start
    method = build_method(cfg).to(device)
    groups = param_groups(method.trainable_modules())
    lr_base = cfg.optim.lr * bs / 256
    # Fused AdamW: one pass over each parameter instead of ~10 element-wise kernels; the per-parameter
    # loop took a third of an MAE step's CPU time at 128 px (profile in docs/history/benchmarks.md, issue 13).
    opt = torch.optim.AdamW(groups, lr=lr_base, betas=tuple(cfg.optim.betas), fused=device.type in ("cpu", "cuda"))
    lr_at = cosine_schedule(lr_base, cfg.optim.min_lr, total, int(cfg.optim.warmup_epochs * spe))
    wd_at = cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total)
    mom_at = cosine_schedule(method.momentum_base, 1.0, total) if method.momentum_base is not None else None

    step, history = 0, []
    ckpt_path = out / CHECKPOINT_FILE
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        if state["config"]["method"] != cfg.method:
            raise ValueError(f"{ckpt_path}: checkpoint is a {state['config']['method']} run, not {cfg.method}; "
                             "use another --out or --no-resume")
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        step, history = int(state["step"]), list(state.get("probes", []))
        say(f"resumed {ckpt_path} at step {step}/{last}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    # The engine's rule (cxrvit.runtime): auto is bf16 where it is native. An fp16-only GPU trains in fp32
    # here: these losses have no gradient scaler.
    bf16 = autocast_dtype(cfg.engine.precision, device) == torch.bfloat16
    model = method
    if distributed:
        model = nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                                    broadcast_buffers=False)

    def checkpoint() -> None:
        if main:
            atomic_torch_save({"method": method.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                        "config": config_to_dict(cfg), "probes": history}, ckpt_path)

    def probe_now(epoch: int) -> None:
        if probe is None or not main:
            return
        t = time.time()
        res = run_probes(method.export_encoder(), probe, cfg.probe.size, Preprocessing(size=cfg.probe.size),
                         cfg.probe.k, device, cfg.probe.batch_size,
                         bf16=inference_precision(device) == "bf16")  # a scoring pass: fp32
        rec = {"step": step, "epoch": epoch, "probe_seconds": round(time.time() - t, 1), **res}
        history.append(rec)
        append_log(out / LOG_FILE, {"kind": "probe", **rec})
        say(f"probe @ epoch {epoch}: knn AUROC {res['knn_cls_auroc']:.3f} (cls) {res['knn_mean_auroc']:.3f} (mean), "
            f"linear {res['linear_cls_auroc']:.3f} (cls) {res['linear_mean_auroc']:.3f} (mean)")

    if step == 0 and probe is not None and cfg.probe.every_epochs > 0:
        probe_now(0)  # the random-init reference every later probe is read against
    method.train()
    t0, seen = time.time(), 0
    while step < last:
        epoch, index = divmod(step, spe)
        x = data.batch(epoch, index, bs, source_size, rank, world, device)
        seed = (cfg.engine.seed * 1_000_003 + step) * 64 + rank
        torch.manual_seed(seed)                       # stochastic depth
        gen = torch.Generator().manual_seed(seed)     # crops, jitter, masks
        inputs = method.make_inputs(x, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
            if g["apply_wd"]:
                g["weight_decay"] = wd_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, metrics = model(*inputs, **method.step_kwargs(step / spe))
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{cfg.method} loss is {loss_value} at step {step}; "
                                     "lower optim.lr or raise optim.warmup_epochs (last good checkpoint kept)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(step / spe)
        grad_norm = nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]],
                                             cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf"))
        opt.step()
        if mom_at is not None:
            method.after_step(mom_at(step))
        step += 1
        seen += len(x) * world
        if main and (step % cfg.engine.log_every == 0 or step == last):
            rate = seen / max(time.time() - t0, 1e-9)
            rec = {"kind": "train", "step": step, "epoch": round(step / spe, 3), "loss": loss_value,
                   "lr": lr_at(step - 1), "grad_norm": float(grad_norm), "images_per_s": round(rate, 2), **metrics}
            if mom_at is not None:
                rec["momentum"] = mom_at(step - 1)
            append_log(out / LOG_FILE, rec)
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
    if probe is not None and (not history or history[-1]["step"] != step):
        probe_now(step // spe)
        checkpoint()
    backbone = out / BACKBONE_FILE
    if main:
        export_backbone(method.export_encoder(), backbone, arch=cfg.model.arch, method=cfg.method,
                        cls_token=method.cls_token_note, extra={"steps": step, "images": len(data)})
        (out / "pretrain.json").write_text(json.dumps({
            "method": cfg.method, "steps": step, "images": len(data), "backbone": BACKBONE_FILE,
            "precision": "bf16" if bf16 else "fp32", "device": str(device),
            "cls_token": method.cls_token_note, "probes": history}, indent=2))
    if distributed:
        dist.barrier()
    return PretrainResult(out, backbone, step, history)


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
