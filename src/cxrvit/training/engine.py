"""The supervised training loop: ``train(cfg, cache, train_rows, val_rows, out_dir) -> out_dir``.

One optimizer step = one global batch (``schedule.batch_size`` images over all ranks and all
accumulation micro-batches). Everything that decides the next step lives in the checkpoint:
weights, optimizer, EMA, the step/epoch/batch counters, and every RNG (python, numpy, torch,
the augmentation generator); the data order is a function of (seed, epoch), so a resumed run
continues with exactly the batches, augmentations and updates of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cxrvit.data.loader import BatchLoader
from cxrvit.data.preprocess import Preprocessing
from cxrvit.evaluation.metrics import tune_thresholds
from cxrvit.fileio import atomic_write, json_safe
from cxrvit.inference.bundle import save_bundle
from cxrvit.model.vit import build_model
from cxrvit.runtime import PRECISION_NAMES, autocast_dtype
from cxrvit.training import checkpointing as ckpt
from cxrvit.training import distributed as dist_
from cxrvit.training.augment import BatchAugment
from cxrvit.training.config import TrainConfig, config_from_dict, config_to_dict, save_config
from cxrvit.training.ema import ModelEMA
from cxrvit.training.losses import build_loss
from cxrvit.training.runlog import CURVES, RunLog, plot_learning_curves, read_metrics
from cxrvit.training.validation import predict, selection_score

BEST = "best.safetensors"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class Progress:
    step: int = 0                # optimizer steps done
    epoch: int = 0               # current epoch
    batch: int = 0               # next batch of the current epoch
    best_score: float = -math.inf
    best_epoch: int = -1
    history: list = field(default_factory=list)   # per-epoch validation summaries

    def to_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "best_score": self.best_score,
                "best_epoch": self.best_epoch, "history": json.dumps(self.history)}

    @classmethod
    def from_dict(cls, d: dict) -> "Progress":
        return cls(int(d["step"]), int(d["epoch"]), int(d["batch"]), float(d["best_score"]),
                   int(d["best_epoch"]), json.loads(d["history"]))


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Linear warmup to ``base``, then half-cosine to ``minimum`` at ``total`` steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return minimum + 0.5 * (base - minimum) * (1 + math.cos(math.pi * min(t, 1.0)))


def train(cfg: TrainConfig, cache, train_rows, val_rows, out_dir, init=None, device=None,
          resume: bool = False, progress: bool = True) -> Path:
    """Train, validate every epoch, keep the best-on-validation weights, write the bundle to ``out_dir``."""
    cfg.validate()
    start_from = None
    if cfg.strategy in ("linear_probe", "lp_ft"):
        from cxrvit.training.linear_probe import fit_linear_probe
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Every rank would fit (and write) the same probe: one process does it in seconds anyway.
            raise ValueError(f"strategy={cfg.strategy} fits its probe in one process; run it without torchrun")
        if cfg.strategy == "linear_probe":
            return fit_linear_probe(cfg, cache, train_rows, val_rows, out_dir, init=init, device=device,
                                    resume=resume, progress=progress)
        # LP-FT (Kumar et al., ICLR 2022): fit the head on frozen features first, so fine-tuning starts
        # from a head that already ranks the findings instead of one whose random gradients distort the
        # backbone. The probe sees the training rows only: validation still selects and sets thresholds.
        probe = fit_linear_probe(cfg, cache, train_rows, np.zeros(0, dtype=np.int64), Path(out_dir) / "probe",
                                 init=init, device=device, resume=True, progress=progress)
        start_from = probe / "model.safetensors"
    ctx = dist_.setup(device or cfg.engine.device)
    try:
        return Trainer(cfg, cache, np.asarray(train_rows), np.asarray(val_rows), Path(out_dir), init, ctx,
                       resume, progress, start_from=start_from).run()
    finally:
        dist_.cleanup(ctx)


class Trainer:
    def __init__(self, cfg: TrainConfig, cache, train_rows: np.ndarray, val_rows: np.ndarray, out: Path,
                 init, ctx: dist_.DistContext, resume: bool, progress: bool, start_from: Path | None = None):
        self.cfg, self.cache, self.out, self.ctx, self.show_progress = cfg, cache, out, ctx, progress
        self.device = ctx.device
        if len(train_rows) == 0 or len(val_rows) == 0:
            raise ValueError(f"need training and validation rows, got {len(train_rows)} and {len(val_rows)}")
        self.labels = list(cfg.data.labels)
        self.scored = cfg.scored_labels
        last = out / ckpt.LAST
        if not resume and last.exists():
            raise FileExistsError(f"{out} already holds a run ({ckpt.LAST}); pass resume=True (--resume) "
                                  f"to continue it, or choose a new output folder")
        state = ckpt.load_checkpoint(last) if resume and last.exists() else None
        if state is not None:
            saved = config_from_dict(state["config"], source=str(last))
            if config_to_dict(saved) != config_to_dict(cfg):
                raise ValueError(f"{last}: the run was started with a different config; resume with "
                                 f"the config in {out / 'config.yaml'}")

        torch.manual_seed(cfg.engine.seed)
        if cfg.engine.deterministic and self.device.type == "cuda":
            # CPU kernels are deterministic already. On CUDA, pick deterministic kernels but do not let
            # torch fill every new tensor with NaN (its default in this mode): that costs real time.
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = False

        # -- data -------------------------------------------------------------------------------
        self.val_rows = val_rows
        targets = cache.labels(self.labels)
        b = cfg.schedule.batch_size
        if b % ctx.world_size:
            raise ValueError(f"schedule.batch_size={b} is not divisible by the {ctx.world_size} processes")
        self.rank_batch = b // ctx.world_size
        self.loader = BatchLoader(cache, train_rows, targets, batch_size=self.rank_batch, shuffle=True,
                                  seed=cfg.engine.seed, drop_last=True, rank=ctx.rank, world_size=ctx.world_size)
        self.val_loader = BatchLoader(cache, val_rows, targets, batch_size=cfg.eval.batch_size, shuffle=False,
                                      seed=0, drop_last=False)
        if len(self.loader) == 0:
            raise ValueError(f"{len(train_rows)} training rows make no full batch of {b}; lower schedule.batch_size")
        self.steps_per_epoch = len(self.loader)
        self.total_steps = cfg.schedule.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)

        # -- model, optimizer, loss -----------------------------------------------------------
        model = build_model(cfg.model.arch, num_classes=len(self.labels), drop_path_rate=cfg.model.drop_path,
                            attention=cfg.model.attention, pos_embed=cfg.model.pos_embed)
        self.init_report = None
        if init is not None and state is None:
            from cxrvit.model.checkpoints import load_backbone
            _, self.init_report = load_backbone(init, model)
        if start_from is not None and state is None:
            model.load_state_dict(load_file(str(start_from)))   # the probe: same backbone, fitted head
        self.model = model.to(self.device)
        self.prep = Preprocessing(size=cfg.model.img_size)
        self.amp = autocast_dtype(cfg.engine.precision, self.device)
        # Layer-wise decay assumes pre-trained early blocks worth protecting. From random init it would
        # all but freeze them (0.75**12 = 3% of the lr for block 1), so it applies only with --init.
        self.layer_decay = cfg.optim.layer_decay if init is not None else 1.0
        groups = self.model.param_groups_layer_decay(cfg.optim.weight_decay, self.layer_decay)
        fused = cfg.optim.fused and self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), fused=fused)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.ema = ModelEMA(self.model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
        self.eval_model = copy.deepcopy(self.model) if self.ema else self.model
        self.loss_fn = build_loss(cfg.loss, targets[train_rows]).to(self.device)
        self.augment = BatchAugment(cfg.augment, cfg.model.img_size, seed=cfg.engine.seed + 1)
        self.net: nn.Module = self.model
        if ctx.distributed:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.engine.compile:
            self.net = torch.compile(self.net)

        self.progress = Progress()
        if state is not None:
            self._load_state(state)
        else:
            ckpt.seed_everything(cfg.engine.seed + ctx.rank)  # drop-path masks differ between ranks
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        self.log = RunLog(out, enabled=ctx.is_main, resume_step=self.progress.step if state else None)

    # -- checkpoint state --------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "format": "cxrvit-train-checkpoint/1",
            "config": config_to_dict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "augment": self.augment.state_dict(),
            "rng": ckpt.capture_rng(),
            "progress": self.progress.to_dict(),
        }

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.augment.load_state_dict(state["augment"])
        ckpt.restore_rng(ckpt.rng_for_rank(state, self.ctx.rank, self.ctx.world_size))
        self.progress = Progress.from_dict(state["progress"])

    def save_checkpoint(self) -> None:
        # Every rank is at the same step; only rank 0 writes. The states are identical under DDP except
        # the generators (drop-path masks differ per rank), so every rank's are gathered into the file.
        rng_ranks = dist_.gather_to_main(self.ctx, ckpt.capture_rng())
        if self.ctx.is_main:
            ckpt.atomic_torch_save({**self._state(), "rng_ranks": rng_ranks}, self.out / ckpt.LAST)
        dist_.barrier(self.ctx)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> Path:
        cfg, p = self.cfg, self.progress
        bar = self._progress_bar()
        while p.epoch < cfg.schedule.epochs:
            self.loader.set_epoch(p.epoch)
            self.net.train()
            t0, seen = time.perf_counter(), 0
            for batch in self.loader.iter_from(p.batch):
                loss = self.train_step(batch)
                p.step += 1
                p.batch += 1
                seen += len(batch.images) * self.ctx.world_size
                ips = seen / (time.perf_counter() - t0)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}", epoch=p.epoch)
                if p.step % cfg.engine.log_every == 0 or p.batch == self.steps_per_epoch:
                    self.log.write({"kind": "train", "step": p.step, "epoch": p.epoch, "loss": loss,
                                    "lr": self.optimizer.param_groups[-1]["lr"], "img_per_s": ips})
                if cfg.engine.checkpoint_every and p.step % cfg.engine.checkpoint_every == 0:
                    self.save_checkpoint()
            self.end_epoch()
        if bar is not None:
            bar.close()
        return self.finish()

    def train_step(self, batch) -> float:
        cfg, p = self.cfg, self.progress
        lr = lr_at(p.step, self.total_steps, self.warmup_steps, cfg.optim.lr, cfg.optim.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        images = batch.images.to(self.device, non_blocking=True)
        targets = batch.targets.to(self.device, non_blocking=True)
        # Draw augmentation parameters for the whole global batch and keep this rank's share,
        # so that N processes see what one process with the same global batch would.
        r, b = self.ctx.rank, len(images)
        # BatchLoader deals rank r the global positions r, r + W, r + 2W, ... of each global batch.
        x, y = self.augment(images, targets, draw=b * self.ctx.world_size, take=slice(r, b * self.ctx.world_size, self.ctx.world_size))
        x = self.prep.normalize(x)

        accum = cfg.schedule.grad_accum
        total = torch.zeros((), device=self.device)
        for i, (xs, ys) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
            sync = i == accum - 1 or not self.ctx.distributed
            ctx = self.net.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    logits = self.net(xs)
                loss = self.loss_fn(logits, ys) * (len(xs) / len(x))
                self.scaler.scale(loss).backward()
            total += loss.detach()
        loss_value = dist_.mean_across(self.ctx, total).item()
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite training loss ({loss_value}) at step {p.step + 1} (epoch {p.epoch}, batch {p.batch}); "
                f"stopping. Weights were not updated; the last good checkpoint is {self.out / ckpt.LAST}"
                f"{'' if (self.out / ckpt.LAST).exists() else ' (none written yet)'}. Lower optim.lr, "
                f"enable optim.clip_grad, or use engine.precision=fp32.")
        if cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model)
        return loss_value

    def end_epoch(self) -> None:
        p = self.progress
        if self.ctx.is_main:
            if self.ema:
                self.ema.copy_to(self.eval_model)
            result = predict(self.eval_model, self.val_loader, self.prep, self.cfg.model.img_size, self.device,
                             self.cfg.eval.tta)
            metrics = result.metrics(self.labels, self.scored)
            score = selection_score(metrics, self.cfg.eval.select)
            improved = score > p.best_score
            if improved:
                p.best_score, p.best_epoch = score, p.epoch
                _atomic_save_weights(self.eval_model, self.out / BEST)
            summary = {"kind": "val", "step": p.step, "epoch": p.epoch, "score": score, "best": improved, **metrics}
            self.log.write(summary)
            p.history.append({"epoch": p.epoch, "score": score, "val_loss": metrics["val_loss"],
                              "mean_auroc_scored": metrics["mean_auroc_scored"], "f1": metrics["f1"]})
            if self.show_progress:
                au = " ".join(f"{s}={metrics['auroc'][s]:.3f}" for s in self.scored)
                f1 = " ".join(f"{s}={v:.3f}" for s, v in metrics["f1"].items())
                from tqdm import tqdm  # tqdm.write keeps the line clear of the progress bar
                tqdm.write(f"epoch {p.epoch}: val_loss={metrics['val_loss']:.4f} AUROC {au} | F1 {f1}"
                           f"{'  (best)' if improved else ''}")
        p.epoch += 1
        p.batch = 0
        self.save_checkpoint()

    def finish(self) -> Path:
        """Best weights -> validation probabilities -> max-F1 thresholds -> model bundle."""
        if self.ctx.is_main:
            self.eval_model.load_state_dict(load_file(str(self.out / BEST), device=str(self.device)))
            result = predict(self.eval_model, self.val_loader, self.prep, self.cfg.model.img_size, self.device,
                             self.cfg.eval.tta)
            thresholds = tune_thresholds(result.targets, result.probs)
            metrics = result.metrics(self.labels, self.scored)
            names = [str(n) for n in self.cache.index["image"].to_numpy()[self.val_rows]]
            save_bundle(self.out, self.eval_model, self.labels, dict(zip(self.labels, thresholds.tolist())),
                        self.prep, arch=self.cfg.model.arch, threshold_source={"split": "val", "images": names},
                        config=config_to_dict(self.cfg),
                        extra={"training": {"best_epoch": self.progress.best_epoch, "steps": self.progress.step,
                                            "val_metrics": json_safe(metrics), "tta": self.cfg.eval.tta,
                                            "weights": "ema" if self.ema else "model",
                                            "precision": PRECISION_NAMES[self.amp]}})
            self.log.close()
            plot_learning_curves(read_metrics(self.log.path), self.out / CURVES, self.scored)
        dist_.barrier(self.ctx)
        return self.out

    def _progress_bar(self):
        if not (self.show_progress and self.ctx.is_main):
            return None
        from tqdm import tqdm
        return tqdm(total=self.total_steps, initial=self.progress.step, unit="step", dynamic_ncols=True)


def _atomic_save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))
