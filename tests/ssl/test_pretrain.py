"""Pre-training on the shared engine: resume after a crash equals an uninterrupted run; export; logs; mixed caches."""
import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxrvit.model.vit import vit_tiny
from cxrvit.engine import distributed
from cxrvit.engine.checkpoint import load_checkpoint
from cxrvit.ssl.pretrain import UnlabelledImages, pretrain
from sslfakes import ArrayCache, tiny_config


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["dino", "ijepa"])
def test_resume_after_crash_equals_uninterrupted_run(method, tiny_cache, tmp_path):
    cfg = tiny_config(method, schedule={"epochs": 2, "batch_size": 16})   # 3 steps/epoch, 6 steps
    full = pretrain(cfg, [tiny_cache], tmp_path / "full", quiet=True)

    def crash(step):
        if step == 5:   # after step 5; the last checkpoint is step 4 (checkpoint_every=2)
            raise Killed
    with pytest.raises(Killed):
        pretrain(cfg, [tiny_cache], tmp_path / "crashed", on_step=crash, quiet=True)
    crashed = load_checkpoint(tmp_path / "crashed" / "last.pt")
    assert crashed["step"] == 4 and crashed["seconds"] > 0
    t0 = time.time()
    resumed = pretrain(cfg, [tiny_cache], tmp_path / "crashed", resume=True, quiet=True)
    second_process = time.time() - t0
    assert resumed.steps == full.steps == 6
    # the cost is the whole run's: the first process's time up to its checkpoint, plus the second's
    assert crashed["seconds"] < resumed.seconds <= crashed["seconds"] + second_process
    summary = json.loads((tmp_path / "crashed" / "pretrain.json").read_text())
    assert summary["seconds"] == round(resumed.seconds, 1)

    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "crashed" / "last.pt")
    assert a["method"].keys() == b["method"].keys()
    for k in a["method"]:   # student, EMA teacher, DINO centre: bit-identical
        assert torch.equal(a["method"][k], b["method"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert torch.equal(a["rng"]["generators"]["views"], b["rng"]["generators"]["views"])  # the next views too
    full_w, resumed_w = load_file(str(full.backbone)), load_file(str(resumed.backbone))
    assert full_w.keys() == resumed_w.keys() and all(torch.equal(full_w[k], resumed_w[k]) for k in full_w)
    # the log reads like one run: every step once
    steps = [json.loads(l)["step"] for l in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == list(range(1, 7))


def test_export_is_a_strict_dino_layout_backbone(tiny_cache, tmp_path):
    cfg = tiny_config("mae", model={"depth": 12}, schedule={"epochs": 1, "batch_size": 16, "max_steps": 1})
    res = pretrain(cfg, [tiny_cache], tmp_path / "run", quiet=True)
    state = load_file(str(res.backbone))
    assert len(state) == 150 and "cls_token" in state and not any(k.startswith("head") for k in state)
    model = vit_tiny(patch_size=8)
    model.load_state_dict(state, strict=True)
    summary = json.loads((tmp_path / "run" / "pretrain.json").read_text())
    assert summary["method"] == "mae" and "attention" in summary["cls_token"]


def test_export_loads_with_load_backbone(tiny_cache, tmp_path):
    checkpoints = pytest.importorskip("cxrvit.model.checkpoints", reason="model part's load_backbone not present")
    cfg = tiny_config("ijepa", model={"depth": 12, "patch_size": 16}, ijepa={"size": 64},
                      schedule={"epochs": 1, "batch_size": 16, "max_steps": 1}, engine={"source_size": 64})
    res = pretrain(cfg, [tiny_cache], tmp_path / "run", quiet=True)
    model = vit_tiny()
    checkpoints.load_backbone(res.backbone, model, strict=True)
    assert torch.equal(model.cls_token.detach(), load_file(str(res.backbone))["cls_token"])


def test_log_records_loss_and_collapse_monitors(tiny_cache, tmp_path):
    cfg = tiny_config("dino", schedule={"epochs": 1, "batch_size": 16})
    pretrain(cfg, [tiny_cache], tmp_path / "run", quiet=True)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert 0.0 <= r["teacher_entropy"] <= 1.0 and 0.0 <= r["teacher_batch_entropy"] <= 1.0
        assert np.isfinite(r["loss"]) and 0.996 <= r["momentum"] <= 1.0


def test_mixed_caches_of_different_sizes(tiny_cache):
    small = ArrayCache(tiny_cache.pixels[:10, ::2, ::2].copy(), tiny_cache.index.iloc[:10].reset_index(drop=True))
    data = UnlabelledImages([tiny_cache, small], rows=[np.arange(6), None], seed=0)
    assert len(data) == 16 and data.batches_per_epoch(4) == 4
    batches = [data.batch(0, i, 4, 32) for i in range(4)]
    assert all(b.shape == (4, 1, 32, 32) for b in batches)
    # Every image is seen exactly once per epoch: compare sums of pixel means against the sources.
    seen = sorted(round(float(v), 4) for b in batches for v in b.mean(dim=(1, 2, 3)))
    expect = sorted(round(float(v), 4) for v in
                    [torch.from_numpy(tiny_cache.pixels[i]).float().mean() / 255 for i in range(6)] +
                    [torch.from_numpy(small.pixels[i]).float().mean() / 255 for i in range(10)])
    assert np.allclose(seen, expect, atol=2e-3)
    # Ranks split a batch without overlap.
    r0, r1 = data.batch(1, 0, 4, 32, rank=0, world=2), data.batch(1, 0, 4, 32, rank=1, world=2)
    assert torch.allclose(torch.cat((r0, r1)).sum(), data.batch(1, 0, 4, 32).sum())


def test_a_global_batch_the_processes_cannot_share_evenly_is_refused(tiny_cache, tmp_path, monkeypatch):
    """9 images over 2 processes would be shares of 5 and 4, averaged as if equal: refused, as training does."""
    monkeypatch.setattr(distributed, "setup", lambda device: distributed.DistContext(rank=0, world_size=2))
    cfg = tiny_config("mae", schedule={"epochs": 1, "batch_size": 9})
    with pytest.raises(ValueError, match=r"schedule.batch_size=9 is not divisible by the 2 processes"):
        pretrain(cfg, [tiny_cache], tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
