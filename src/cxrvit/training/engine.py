"""The supervised training loop: ``train(cfg, cache, train_rows, val_rows, out_dir) -> out_dir``.

One optimizer step = one global batch (``schedule.batch_size`` images over all ranks and all
accumulation micro-batches). Device, DDP, precision, optimizer step, schedule, checkpoints and the
log are the shared engine's (:mod:`cxrvit.engine`); what is this loop's own is the data, the
augmentation, the loss, the EMA, validation and the bundle. Everything that decides the next step
lives in the checkpoint (``last.pt``): weights, optimizer, EMA, the step/epoch/batch counters, and
every RNG (python, numpy, torch, each rank's; the augmentation generator); the data order is a
function of (seed, epoch), so a resumed run continues with exactly the batches, augmentations and
updates of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from cxrvit.data.loader import BatchLoader
from cxrvit.data.preprocess import Preprocessing
from cxrvit.engine import distributed as dist_
from cxrvit.engine.core import Engine, NonFiniteLossError
from cxrvit.engine.optim import apply_schedule, param_groups, warmup_cosine
from cxrvit.engine.runlog import read_metrics
from cxrvit.evaluation.metrics import tune_thresholds
from cxrvit.fileio import json_safe
from cxrvit.inference.bundle import save_bundle, tuning_source
from cxrvit.model.checkpoints import load_init_backbone, save_weights
from cxrvit.model.vit import build_model
from cxrvit.training.augment import BatchAugment
from cxrvit.training.config import TrainConfig, config_from_dict, config_to_dict, save_config
from cxrvit.training.curves import CURVES, plot_learning_curves
from cxrvit.training.ema import ModelEMA
from cxrvit.training.linear_probe import fit_linear_probe
from cxrvit.training.losses import build_loss
from cxrvit.training.validation import predict, selection_score

BEST = "best.safetensors"


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


def resolve_init(cfg: TrainConfig, init=None) -> str | None:
    """The backbone file a run starts from: ``init`` (``--init``, an arm's init or pre-training stage) when
    given, else the recipe's ``model.init`` (``improved`` names the shipped learned backbone), else None.
    A recipe's file that is not there is an error naming it and the ways to get it."""
    if init is not None or not cfg.model.init:
        return init
    path = Path(cfg.model.init)
    if not path.is_file():
        raise FileNotFoundError(
            f"recipe {cfg.name!r} starts from model.init={cfg.model.init}, which is not a file here (relative paths "
            f"are read from the current directory, {Path.cwd()}): run from the repository root, give --init FILE, "
            f"or --set model.init= to start from the recipe's own initialisation")
    return str(path)


def train(cfg: TrainConfig, cache, train_rows, val_rows, out_dir, init=None, device=None,
          resume: bool = False, progress: bool = True) -> Path:
    """Train, validate every epoch, keep the best-on-validation weights, write the bundle to ``out_dir``.

    ``resume``: the engine's one rule (:func:`cxrvit.engine.checkpoint.open_run`): off, a folder holding
    ``last.pt`` is refused; on, the run continues from it (same config) or starts fresh without one.
    """
    cfg.validate()
    init = resolve_init(cfg, init)
    # The saved config.yaml (and the bundle's config) names the file the run really started from: --init or an
    # arm's stage replaces the recipe's model.init, and a config that still named the recipe's file (or none)
    # would misreport the run's provenance. A copy, so a caller's config (an arm's identity) is untouched.
    cfg = replace(cfg, model=replace(cfg.model, init=str(init) if init else ""))
    start_from = None
    if cfg.strategy in ("linear_probe", "lp_ft"):
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
        self.engine = Engine(out, ctx, cfg.engine.precision, cfg.engine.seed, cfg.engine.deterministic)
        # model.init only chooses the weights of step 0; a checkpoint carries its own (and runs started before
        # the config recorded --init saved "" there), so it is free on resume.
        state = self.engine.open(resume, config_to_dict(cfg), free=("model.init",),
                                 parse=lambda saved, source: config_to_dict(config_from_dict(saved, source=source)))

        # -- data -------------------------------------------------------------------------------
        self.val_rows = val_rows
        targets = cache.labels(self.labels)
        b = cfg.schedule.batch_size
        if b % ctx.world_size:
            raise ValueError(f"schedule.batch_size={b} is not divisible by the {ctx.world_size} processes")
        self.rank_batch = b // ctx.world_size
        accum = cfg.schedule.grad_accum
        if self.rank_batch % accum:
            # Fewer micro-batches than grad_accum would all run under no_sync: the ranks would never all-reduce.
            raise ValueError(f"schedule.batch_size={b} over {ctx.world_size} processes is {self.rank_batch} images "
                             f"each, which schedule.grad_accum={accum} does not divide; use a schedule.batch_size "
                             f"divisible by {ctx.world_size * accum} (processes x grad_accum)")
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
                            attention=cfg.model.attention, pos_embed=cfg.model.pos_embed,
                            global_pool=cfg.model.global_pool,
                        n_last_blocks=cfg.model.n_last_blocks)
        self.init_report = None
        if init is not None and state is None:   # a file with no backbone weights for this model is refused
            self.init_report = load_init_backbone(init, model, quiet=not ctx.is_main)
        if start_from is not None and state is None:
            model.load_state_dict(load_file(str(start_from)))   # the probe: same backbone, fitted head
        self.model = model.to(self.device)
        self.prep = Preprocessing(size=cfg.model.img_size, source_size=cache.size)
        # Layer-wise decay assumes pre-trained early blocks worth protecting. From random init it would
        # all but freeze them (0.75**12 = 3% of the lr for block 1), so it applies only with --init.
        self.layer_decay = cfg.optim.layer_decay if init is not None else 1.0
        groups = param_groups(self.model, cfg.optim.weight_decay, self.layer_decay)
        self.optimizer = self.engine.build_optimizer(groups, cfg.optim.lr, cfg.optim.betas, cfg.optim.fused)
        self.ema = ModelEMA(self.model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
        self.eval_model = copy.deepcopy(self.model) if self.ema else self.model
        self.loss_fn = build_loss(cfg.loss, targets[train_rows]).to(self.device)
        self.augment = BatchAugment(cfg.augment, cfg.model.img_size, seed=cfg.engine.seed + 1)
        self.net: nn.Module = self.engine.wrap(self.model, compile=cfg.engine.compile)

        self.progress = Progress()
        if state is not None:
            self._load_state(state)
        self.engine.start(state)  # optimizer + this rank's generators back, or seeded by (seed, rank)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        self.log = self.engine.open_log(state, self.progress.step, keep=self._checkpointed)

    # -- checkpoint state (the engine adds optimizer, scaler and every rank's generators) ------
    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        # One generator for the global batch, identical on every rank: rank 0's copy is the state.
        self.augment.load_state_dict(state["augment"])
        self.progress = Progress.from_dict(state["progress"])

    def _checkpointed(self, record: dict) -> bool:
        """Whether the checkpoint resumed from covers ``record``. An epoch's val record is written before the
        checkpoint that ends the epoch, at the step a mid-epoch checkpoint may also have saved; the checkpoint's
        ``epoch`` counts the epochs it saw end, so a val record of a later epoch is redone on resume."""
        return record.get("kind") != "val" or record.get("epoch", 0) < self.progress.epoch

    def save_checkpoint(self) -> None:
        self.engine.save({"format": "cxrvit-train-checkpoint/1", "config": config_to_dict(self.cfg),
                          "model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                          "augment": self.augment.state_dict(), "progress": self.progress.to_dict()})

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
        apply_schedule(self.optimizer, warmup_cosine(p.step, self.total_steps, self.warmup_steps, cfg.optim.lr,
                                                     cfg.optim.min_lr))
        images = batch.images.to(self.device, non_blocking=True)
        targets = batch.targets.to(self.device, non_blocking=True)
        # Draw augmentation parameters for the whole global batch and keep this rank's share,
        # so that N processes see what one process with the same global batch would (mixup/cutmix
        # aside: they pair images within this rank's share, see BatchAugment.mix).
        r, b = self.ctx.rank, len(images)
        # BatchLoader deals rank r the global positions r, r + W, r + 2W, ... of each global batch.
        x, y = self.augment(images, targets, draw=b * self.ctx.world_size, take=slice(r, b * self.ctx.world_size, self.ctx.world_size))
        x = self.prep.normalize(x)

        accum = cfg.schedule.grad_accum
        total = torch.zeros((), device=self.device)
        chunks = list(zip(x.chunk(accum), y.chunk(accum)))
        for i, (xs, ys) in enumerate(chunks):
            # DDP all-reduces the gradients once, on the last micro-batch (the forward must be inside
            # no_sync too: DDP prepares the reduction there). The last one that exists: chunk() may make fewer.
            with (self.net.no_sync() if i < len(chunks) - 1 and self.ctx.distributed else contextlib.nullcontext()):
                with self.engine.autocast():
                    logits = self.net(xs)
                loss = self.loss_fn(logits, ys) * (len(xs) / len(x))
                self.engine.backward(loss)
            total += loss.detach()
        loss_value = dist_.mean_across(self.ctx, total).item()
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite training loss ({loss_value}) at step {p.step + 1} (epoch {p.epoch}, batch {p.batch}); "
                f"stopping. Weights were not updated; the last good checkpoint is {self.engine.last}"
                f"{'' if self.engine.last.exists() else ' (none written yet)'}. Lower optim.lr, "
                f"enable optim.clip_grad, or use engine.precision=fp32.")
        self.engine.step(self.model.parameters(), cfg.optim.clip_grad)
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
            save_bundle(self.out, self.eval_model, self.labels, dict(zip(self.labels, thresholds.tolist())),
                        self.prep, arch=self.cfg.model.arch, threshold_source=tuning_source(
                            "val", self.cache.index["image"].to_numpy()[self.val_rows],
                            self.cache.patient_ids[self.val_rows]),
                        config=config_to_dict(self.cfg),
                        extra={"training": {"best_epoch": self.progress.best_epoch, "steps": self.progress.step,
                                            "val_metrics": json_safe(metrics), "tta": self.cfg.eval.tta,
                                            "weights": "ema" if self.ema else "model",
                                            "precision": self.engine.precision}})
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
    save_weights(state, path)
