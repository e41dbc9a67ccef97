"""Each SSL method trains for a few real steps at the precision real machines use.

``precision: auto`` is bf16 on every bf16 GPU and on CPUs with native bf16 (cxrvit.runtime), so the
default path is run here with bf16 forced (``CXRVIT_FORCE_BF16=1``), beside explicit ``bf16`` and
``fp32``. A crash (e.g. fp32 and bf16 tensors meeting in an in-place scatter) or a non-finite loss fails.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cxrvit.runtime import FORCE_BF16_ENV
from cxrvit.ssl.pretrain import build_method, pretrain
from sslfakes import tiny_config

pytestmark = pytest.mark.precision

METHODS = ["mae", "dino", "ijepa"]
#: (configured precision, what the run must resolve it to)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nih"
PRECISIONS = [("auto", "bf16"), ("bf16", "bf16"), ("fp32", "fp32")]


def _watch_step_precision(monkeypatch) -> list[str]:
    """Record, at every forward of the pre-training method, whether bf16 autocast is on around it."""
    from cxrvit.ssl import pretrain as pretrain_module

    seen: list[str] = []
    real = pretrain_module.build_method

    def build(cfg):
        method = real(cfg)
        method.register_forward_pre_hook(lambda module, args: seen.append(
            "bf16" if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            else "fp32"))
        return method

    monkeypatch.setattr(pretrain_module, "build_method", build)
    return seen


@pytest.mark.parametrize("precision,resolved", PRECISIONS, ids=[p for p, _ in PRECISIONS])
@pytest.mark.parametrize("method", METHODS)
def test_pretrain_runs_and_exports_at_each_precision(method, precision, resolved, tiny_cache, tmp_path, monkeypatch):
    steps_seen = _watch_step_precision(monkeypatch)
    monkeypatch.setenv(FORCE_BF16_ENV, "1")   # this CPU acts as a bf16 one: auto -> bf16
    cfg = tiny_config(method, schedule={"epochs": 1, "batch_size": 8, "max_steps": 3},
                      engine={"precision": precision, "checkpoint_every": 0})
    res = pretrain(cfg, [tiny_cache], tmp_path / "run", quiet=True)
    assert res.steps == 3
    summary = json.loads((tmp_path / "run" / "pretrain.json").read_text())
    assert summary["precision"] == resolved
    # ... and each training step's forward really ran at that precision, not only the recorded name
    assert steps_seen == [resolved] * 3
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    state = load_file(str(res.backbone))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())


@pytest.mark.parametrize("method", METHODS)
def test_a_bf16_step_sends_finite_gradients_to_every_trainable_parameter(method, tiny_cache):
    """One forward/backward under bf16 autocast, as the loop runs it: the mask tokens, predictor and
    heads all get a finite gradient (a canvas built in the wrong dtype would break this or the step)."""
    torch.manual_seed(0)
    m = build_method(tiny_config(method))
    x = torch.from_numpy(tiny_cache.pixels[:4]).float().div(255).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", antialias=True)
    inputs = m.make_inputs(x, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m(*inputs, **m.step_kwargs(1.0))
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()
    m.after_backward(1.0)
    params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]   # EMA teachers/targets are frozen
    missing = [n for n, p in params if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for _, p in params if p.grad is not None)


@pytest.fixture(scope="module")
def fixture_cache_64(tmp_path_factory):
    from cxrvit.data.cache import prepare_cache

    return prepare_cache(FIXTURES, tmp_path_factory.mktemp("precision") / "cache", 64, workers=1, progress=False,
                         log=lambda *a: None)


#: A 12-block ViT-Tiny/16 (the layout `cxrvit train` builds) at 64 px, 2 steps of each method.
CLI_TINY = ["model.arch=vit_tiny", "model.depth=12", "schedule.epochs=1", "schedule.batch_size=4",
            "schedule.max_steps=2", "engine.log_every=1", "probe.every_epochs=0",
            "mae.size=64", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2",
            "dino.global_size=64", "dino.local_size=32", "dino.n_local=2", "dino.out_dim=64",
            "dino.hidden_dim=32", "dino.bottleneck_dim=16",
            "ijepa.size=64", "ijepa.predictor_dim=32", "ijepa.predictor_depth=1", "ijepa.predictor_heads=2"]


@pytest.mark.parametrize("method", METHODS)
def test_cli_pretrain_at_the_default_precision_then_fine_tune_the_backbone(method, fixture_cache_64, tmp_path,
                                                                           monkeypatch):
    """The issue's path from a fresh clone: `cxrvit pretrain` at `auto` on a bf16 machine, then
    `cxrvit train --init backbone.safetensors` (also at `auto`), each method."""
    from cxrvit.cli import main

    monkeypatch.setenv(FORCE_BF16_ENV, "1")
    sets = lambda items: sum((["--set", s] for s in items), [])  # noqa: E731
    run = tmp_path / method
    assert main(["pretrain", "--method", method, "--data", str(fixture_cache_64.root), "--out", str(run),
                 "--quiet", *sets(CLI_TINY)]) == 0
    assert json.loads((run / "pretrain.json").read_text())["precision"] == "bf16"
    tuned = tmp_path / f"{method}-ft"
    assert main(["train", "--recipe", "finetune", "--data", str(fixture_cache_64.root), "--out", str(tuned),
                 "--init", str(run / "backbone.safetensors"), "--no-progress",
                 *sets(["model.arch=vit_tiny", "model.img_size=64", "schedule.epochs=1",
                        "schedule.batch_size=4", "engine.log_every=1", "optim.warmup_epochs=0"])]) == 0
    meta = json.loads((tuned / "bundle.json").read_text())
    assert meta["training"]["precision"] == "bf16"
    records = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if r.get("kind") == "train")
    # It started from the pre-trained encoder: a few AdamW steps move each weight by about the lr (<1e-3),
    # while an independent random init would differ by ~0.02 (its std) almost everywhere.
    key = "blocks.0.attn.qkv.weight"
    start, final = load_file(str(run / "backbone.safetensors"))[key], load_file(str(tuned / "model.safetensors"))[key]
    assert (final - start).abs().max() < 1e-2


@pytest.mark.parametrize("first,then", [("auto", "fp32"), ("fp32", "auto")])
def test_a_continued_pretraining_crosses_precisions(first, then, tiny_cache, tmp_path, monkeypatch):
    """A last.pt written in bf16 (a GPU, a CPU with native bf16) continues on a machine without it, and the other
    way round: the run's own precision is resolved afresh (it is a new run, not a resume) and its steps stay finite."""
    monkeypatch.setenv(FORCE_BF16_ENV, "1")
    pretrain(tiny_config("mae", schedule={"epochs": 1, "batch_size": 8, "max_steps": 2},
                         engine={"precision": first, "checkpoint_every": 0}), [tiny_cache], tmp_path / "a", quiet=True)
    cfg = tiny_config("mae", init=str(tmp_path / "a" / "last.pt"),
                      schedule={"epochs": 1, "batch_size": 8, "max_steps": 2}, engine={"precision": then, "checkpoint_every": 0})
    pretrain(cfg, [tiny_cache], tmp_path / "b", quiet=True)
    summary = json.loads((tmp_path / "b" / "pretrain.json").read_text())
    assert summary["precision"] == ("bf16" if then == "auto" else "fp32")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
