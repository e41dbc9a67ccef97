"""scripts/run_sample.sh, the main job, end to end on the repository's real NIH fixture images.

The job's real cost is its 956-image feature pass (README); here it runs on the handful of fixture images,
through the very script and the shipped backbone (sample/backbones/), so that a fresh clone is known to run
it: prepare -> (pre-train) -> train improved -> eval on the official test images -> predict with heat-maps.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "nih"
SHIPPED = "sample/backbones/vit_small-mae224-nih-sample.safetensors"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The fixture folder with its test list cut to the images it holds (predict fails on absent files)."""
    d = tmp_path_factory.mktemp("nih")
    shutil.copytree(FIXTURES, d, dirs_exist_ok=True)
    present = {p.name for p in (d / "images").iterdir()}
    tests = [n for n in (d / "test_list.txt").read_text().split() if n in present]
    (d / "test_list.txt").write_text("\n".join(tests) + "\n")
    assert len(tests) >= 3
    return d


@pytest.fixture(scope="module")
def cxrvit(tmp_path_factory) -> Path:
    """`cxrvit` for the script (CXRVIT=...): this checkout's package, one thread."""
    exe = tmp_path_factory.mktemp("bin") / "cxrvit"
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT / 'src'} OMP_NUM_THREADS=1 exec {sys.executable} -m cxrvit \"$@\"\n")
    exe.chmod(0o755)
    return exe


def _run(cxrvit, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, CXRVIT=str(cxrvit))
    return subprocess.run(["bash", "scripts/run_sample.sh", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_main_job_runs_improved_on_the_shipped_backbone_and_reuses_it(data, cxrvit, tmp_path):
    out = tmp_path / "job"
    r = _run(cxrvit, data, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "== 2/5 pre-train: using the shipped backbone" in r.stdout
    meta = json.loads((out / "run" / "bundle.json").read_text())
    assert meta["training"]["strategy"] == "linear_probe" and meta["global_pool"] == "avg"
    assert meta["training"]["init"] == SHIPPED                   # the recipe's model.init, read from the repo root
    metrics = json.loads((out / "test_metrics.json").read_text())
    n_test = len((data / "test_list.txt").read_text().split())
    assert metrics["n_images"] == n_test and metrics["per_image"]["labels"] == 15
    assert len((out / "predictions.csv").read_text().splitlines()) == n_test + 1
    assert any((out / "heatmaps").iterdir())
    # again: the finished run is reused, not retrained
    stamp = (out / "run" / "model.safetensors").stat().st_mtime_ns
    metrics_stamp = (out / "test_metrics.json").stat().st_mtime_ns
    again = _run(cxrvit, data, out, "schedule.epochs=3")
    assert again.returncode == 0 and "is finished" in again.stdout
    assert (out / "run" / "model.safetensors").stat().st_mtime_ns == stamp
    # ... and so are its scores and predictions; the overrides a finished run cannot take are named
    assert "test_metrics.json is up to date" in again.stdout and "heatmaps/ are up to date" in again.stdout
    assert (out / "test_metrics.json").stat().st_mtime_ns == metrics_stamp
    assert "overrides 'schedule.epochs=3' are not applied" in again.stderr


def test_pretrain_flag_reads_its_own_backbone_and_a_run_of_another_start_is_refused(data, cxrvit, tmp_path):
    from cxrvit.ssl.encoder import build_encoder, export_backbone

    out = tmp_path / "own"
    # A finished pre-training in the job's folder is reused (the real one takes hours: README).
    ssl = out / "pretrain-mae224"
    torch.manual_seed(3)
    export_backbone(build_encoder("vit_small"), ssl / "backbone.safetensors", arch="vit_small", method="mae",
                    cls_token="test")
    (ssl / "pretrain.json").write_text(json.dumps({"method": "mae", "steps": 1}))
    r = _run(cxrvit, "--pretrain", data, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"pre-train: {out}/pretrain-mae224 is finished" in r.stdout
    launched = json.loads((out / "own-backbone" / "run" / "run.json").read_text())
    assert launched["init"] == str((ssl / "backbone.safetensors").resolve()) and launched["recipe"] == "improved"
    # never mixed up with the job on the shipped backbone: its run and results live in their own folder
    assert not (out / "run").exists() and not (out / "test_metrics.json").exists()
    assert (out / "own-backbone" / "test_metrics.json").is_file() and (out / "own-backbone" / "predictions.csv").is_file()

    # A run in OUT/run that did not start from the shipped backbone (e.g. the random probe that `improved`
    # was before issue 20) is refused by name instead of being scored as if it were today's product.
    (out / "run").mkdir()
    (out / "run" / "config.yaml").write_text("name: improved\nstrategy: linear_probe\nmodel:\n  init: ''\n")
    refused = _run(cxrvit, data, out)
    assert refused.returncode == 2 and f"{out}/run was trained without the shipped learned backbone" in refused.stderr
