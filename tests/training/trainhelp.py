"""Shared settings for the training tests (a uniquely named module: every test folder has a conftest)."""
from __future__ import annotations

import os
from pathlib import Path

#: A tiny fine-tuning run: vit_tiny at 32 px; 4 optimizer steps per epoch, 2 epochs. Drop-path is off
#: because the DDP test compares against this run and drop-path masks are drawn per rank; fp32
#: because bf16 rounds a gradient summed over 16 images differently from two sums over 8.
TINY = ["strategy=finetune", "model.arch=vit_tiny", "model.img_size=32", "model.drop_path=0", "schedule.epochs=2",
        "schedule.batch_size=16", "engine.checkpoint_every=3", "eval.batch_size=64", "engine.log_every=1",
        "optim.warmup_epochs=0.5", "engine.precision=fp32"]
#: With the ``finetune`` recipe, TINY plus these is the run the engine, resume and DDP tests share, with every
#: piece on: EMA, clipping, ASL, layer decay, affine + photometric augmentation (``improved``'s fine-tuning
#: sections before issue 21 split the probe and the fine-tuning recipe; the same resolved settings). Layer
#: decay applies only to a run with an init, so that run starts from ``tiny_init`` (conftest), a saved backbone.
FT_RECIPE, ALL_ON = "finetune", ["loss.kind=asl", "optim.layer_decay=0.75"]


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env
