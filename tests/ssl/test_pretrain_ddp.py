"""Pre-training under 2-process DDP (gloo, CPU): stopped mid-epoch and resumed, it ends bit-identical to an
uninterrupted 2-process run, so every rank got its own generators back (the ranks draw different views)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nih"
SETS = ["model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "schedule.epochs=2", "schedule.batch_size=4",
        "engine.log_every=1", "engine.checkpoint_every=2", "engine.precision=fp32", "optim.warmup_epochs=1",
        "dino.global_size=32", "dino.local_size=16", "dino.n_local=2", "dino.out_dim=32", "dino.hidden_dim=32",
        "dino.bottleneck_dim=16"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from cxrvit.data.cache import prepare_cache

    out = tmp_path_factory.mktemp("ddp") / "cache"
    prepare_cache(FIXTURES, out, 32, workers=1, progress=False, log=lambda *a: None)
    return out


def _torchrun(cache_dir, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cxrvit",
           "pretrain", "--method", "dino", "--data", str(cache_dir), "--out", str(out), "--device", "cpu",
           "--no-probe", "--quiet", "--include-test",   # all 12 fixture images: 3 steps an epoch
           *[a for s in SETS for a in ("--set", s)], *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_process_pretraining_resumes_bit_exactly(cache_dir, tmp_path):
    _torchrun(cache_dir, tmp_path / "full")
    _torchrun(cache_dir, tmp_path / "cut", "--set", "schedule.max_steps=4")   # stops mid-epoch 1
    _torchrun(cache_dir, tmp_path / "cut", "--resume")                      # max_steps may change on resume
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert full["step"] == cut["step"] == 6
    ranks = full["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["generators"]["views"], ranks[1]["generators"]["views"])
    for k in full["method"]:   # student, EMA teacher, DINO centre
        assert torch.equal(full["method"][k], cut["method"][k]), k
