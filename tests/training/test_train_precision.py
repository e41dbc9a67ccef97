"""Each training strategy trains at the precision real machines use, and the bundle says which.

``precision: auto`` resolves to bf16 on bf16 GPUs and native-bf16 CPUs; here bf16 is forced
(``CXRVIT_FORCE_BF16=1``) so the default path runs on any CPU, beside explicit ``bf16`` and ``fp32``.
A crash or a non-finite loss fails. Scoring (validation, the probe's feature pass) is fp32 by design
(cxrvit.runtime.inference_precision), so a probe reads no engine.precision and its bundle records fp32.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxrvit.runtime import FORCE_BF16_ENV
from cxrvit.training.commands import choose_rows
from cxrvit.training.config import load_recipe
from cxrvit.training.engine import train
from trainhelp import ALL_ON, FT_RECIPE, TINY

pytestmark = pytest.mark.precision

PRECISIONS = [("auto", "bf16"), ("bf16", "bf16"), ("fp32", "fp32")]
STRATEGIES = {
    "finetune": TINY + ["schedule.epochs=1"],
    "linear_probe": ["model.arch=vit_tiny", "model.img_size=32", "strategy=linear_probe", "probe.c_grid=[0.1]",
                     "probe.cv_folds=2"],
    "lp_ft": TINY + ["strategy=lp_ft", "schedule.epochs=1", "probe.cv_folds=2", "probe.c_grid=[0.1]"],
}


def _train_losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("kind") == "train"]


@pytest.mark.parametrize("precision,resolved", PRECISIONS, ids=[p for p, _ in PRECISIONS])
@pytest.mark.parametrize("recipe,strategy,pool,blocks", [("baseline", "finetune", "token", 1),
                                                         ("finetune", "finetune", "token", 1),
                                                         ("finetune", "lp_ft", "token", 1), ("finetune", "lp_ft", "avg", 1),
                                                         ("finetune", "lp_ft", "avg", 4),
                                                         ("finetune", "finetune", "avgmax", 1),
                                                         ("finetune", "lp_ft", "token+avg", 1)])
def test_each_strategy_trains_at_each_precision(recipe, strategy, pool, blocks, precision, resolved, tiny_cache,
                                                 tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv(FORCE_BF16_ENV, "1")   # this CPU acts as a bf16 one: auto -> bf16
    seen = _watch_forward_precision(monkeypatch)
    # The finetune recipe with every piece on (ALL_ON: ASL, layer decay 0.75), as improved's fine-tuning sections were.
    extra = ALL_ON if recipe == FT_RECIPE else []
    cfg = load_recipe(recipe, STRATEGIES[strategy] + extra + [f"engine.precision={precision}",
                                                              f"model.global_pool={pool}",
                                                              f"model.n_last_blocks={blocks}"])
    meta, out = _train(cfg, tiny_cache, tmp_path)
    assert meta["training"]["precision"] == resolved and meta["global_pool"] == pool
    assert meta["n_last_blocks"] == blocks
    losses = _train_losses(out)
    assert losses and all(math.isfinite(v) for v in losses)
    # ... and the training forwards really ran at that precision, the validation (threshold) passes in fp32
    assert {p for mode, p in seen if mode == "train"} == {resolved}
    assert {p for mode, p in seen if mode == "eval"} == {"fp32"}


def _watch_forward_precision(monkeypatch) -> list[tuple[str, str]]:
    """Record, at every forward of the model the engine builds, (train|eval, bf16|fp32 autocast around it)."""
    from cxrvit.training import engine as engine_module

    seen: list[tuple[str, str]] = []
    real = engine_module.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(
            ("train" if module.training else "eval",
             "bf16" if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
             else "fp32")))
        return model

    monkeypatch.setattr(engine_module, "build_model", build)
    return seen


def test_probe_scores_in_fp32_on_a_bf16_machine(tiny_cache, tmp_path, monkeypatch, one_thread):
    """The probe has no training precision (its features are the fp32 scoring pass), so asking for one is
    an error naming the key, and on a machine where ``auto`` means bf16 the bundle still says fp32."""
    with pytest.raises(ValueError, match=r"engine\.precision.*not read by strategy linear_probe"):
        load_recipe("probe-random", STRATEGIES["linear_probe"] + ["engine.precision=bf16"])
    monkeypatch.setenv(FORCE_BF16_ENV, "1")
    meta, _ = _train(load_recipe("probe-random", STRATEGIES["linear_probe"]), tiny_cache, tmp_path)
    assert meta["training"]["precision"] == "fp32"


def _train(cfg, cache, tmp_path):
    """Train ``cfg`` on the tiny cache; check the bundle holds finite fp32 weights and thresholds."""
    tr, va, _ = choose_rows(cache, cfg.data.val_fraction, cfg.data.split_seed)
    out = train(cfg, cache, tr, va, tmp_path / "run", progress=False)
    meta = json.loads((out / "bundle.json").read_text())
    weights = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    thresholds = np.asarray(list(meta["thresholds"].values()), dtype=float)
    assert np.isfinite(thresholds).all()
    return meta, out
