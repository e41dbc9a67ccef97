"""The two guarantees that need real processes: SIGKILL + --resume reproduces an uninterrupted
run exactly, and 2-process DDP (gloo, CPU) matches 1 process with the same global batch."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cxrvit.cli import main as cli_main
from trainhelp import ALL_ON, FT_RECIPE, TINY, subprocess_env


def _train_cmd(cache_dir, out, init):
    sets = [a for item in TINY + ALL_ON for a in ("--set", item)]
    return ["train", "--recipe", FT_RECIPE, "--data", str(cache_dir), "--out", str(out), "--init", str(init),
            "--no-progress", *sets]


def _assert_same_state(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max().item())


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tiny_cache_dir, tiny_init, tiny_reference_run,
                                                                  tmp_path, one_thread):
    _, _, _, reference = tiny_reference_run
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cxrvit", *_train_cmd(tiny_cache_dir, out, tiny_init)],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "last.pt").exists():  # the first checkpoint: step 3, in the middle of epoch 0
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(out / "last.pt", weights_only=True)["progress"]
    assert killed_at["step"] < 8 and not (out / "bundle.json").exists(), "the run finished before the kill"

    assert cli_main(["train", "--resume", str(out), "--no-progress"]) == 0

    ref, got = torch.load(reference / "last.pt", weights_only=True), torch.load(out / "last.pt", weights_only=True)
    # the run starts from --init, so layer decay is on: block i's groups at 0.75**(13 - i) of the lr, resumed as such
    scales = [g["lr_scale"] for g in got["optimizer"]["param_groups"]]
    assert scales == [g["lr_scale"] for g in ref["optimizer"]["param_groups"]]
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.75 ** 13) and len(set(scales)) == 14
    _assert_same_state(ref["model"], got["model"])
    _assert_same_state(ref["ema"]["shadow"], got["ema"]["shadow"])
    assert torch.equal(ref["augment"]["generator"], got["augment"]["generator"])
    _assert_same_state(load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors")))
    assert json.loads((reference / "bundle.json").read_text())["thresholds"] == \
        json.loads((out / "bundle.json").read_text())["thresholds"]
    # the log reads like one run: every step once
    steps = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(r)["kind"] == "train"]
    assert steps == list(range(1, 9))


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tiny_cache_dir, tiny_init,
                                                                        tiny_reference_run, tmp_path):
    _, _, _, reference = tiny_reference_run
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cxrvit", *_train_cmd(tiny_cache_dir, out, tiny_init), "--device", "cpu"]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ref, got = torch.load(reference / "last.pt", weights_only=True), torch.load(out / "last.pt", weights_only=True)
    assert got["progress"]["step"] == ref["progress"]["step"] == 8
    # every rank's generators are in the checkpoint (they differ: drop-path masks are drawn per rank)
    ranks = got["rng_ranks"]
    assert len(ranks) == 2 and torch.equal(ranks[0]["torch"], got["rng"]["torch"])
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    # gradients are averaged over two half-batches instead of one full batch: equal up to float
    # rounding, which Adam's normalisation can amplify to a fraction of one lr-sized update
    _assert_same_state(ref["model"], got["model"], atol=5e-4)
    losses = [[json.loads(r)["loss"] for r in (d / "metrics.jsonl").read_text().splitlines()
               if json.loads(r)["kind"] == "train"] for d in (reference, out)]
    assert len(losses[0]) == len(losses[1]) == 8
    assert all(abs(a - b) < 1e-3 for a, b in zip(*losses)), losses
