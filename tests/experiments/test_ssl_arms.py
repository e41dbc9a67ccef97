"""The SSL arms file (bench/arms/ssl.yaml, once bench/ssl_bench.py) end to end on a real prepared cache:
per-fold pre-training on the training folds only, `improved` from that backbone, every arm pooled."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cxrvit.experiments.arms import run_arms
from cxrvit.experiments.plan import load_plan

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "nih"
FINETUNE = ["model.arch=vit_tiny", "model.img_size=32", "schedule.epochs=1", "schedule.batch_size=4",
            "engine.precision=fp32", "eval.batch_size=8"]
MAE = ["model.arch=vit_tiny", "model.depth=12", "schedule.epochs=1", "schedule.batch_size=4", "engine.precision=fp32",
       "engine.log_every=1", "mae.size=32", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2",
       "mae.mask_ratio=0.75", "probe.size=32", "probe.k=3", "probe.every_epochs=0"]


@pytest.fixture(scope="module")
def fixture_cache(tmp_path_factory):
    from cxrvit.data.cache import prepare_cache

    return prepare_cache(FIXTURES, tmp_path_factory.mktemp("ssl") / "cache", 32, workers=1, progress=False,
                         log=lambda *a: None)


def test_ssl_arms_file_pools_every_arm_on_the_same_folds(fixture_cache, tmp_path):
    shipped = load_plan(ROOT / "bench" / "arms" / "ssl.yaml")
    assert shipped.reference == "probe-random" and set(shipped.pretrain) == {"dino", "mae", "ijepa"}
    # The shipped plan cut to one method and a CPU budget.
    plan = replace(shipped, folds=2, overrides=FINETUNE,
                   arms=[a for a in shipped.arms if a.name in ("baseline", "probe-random", "mae+improved")],
                   pretrain={"mae": replace(shipped.pretrain["mae"], overrides=MAE)})
    res = run_arms(plan, fixture_cache.root, tmp_path / "bench", cache=fixture_cache, n_resamples=20,
                   progress=False, log=lambda s: None)
    assert res.arms == ["baseline", "probe-random", "mae+improved"]
    assert all(res.scores[a].n_images == len(fixture_cache) for a in res.arms)
    # Pre-training saw the training folds only: fewer images than the cache, once per fold.
    seen = [json.loads((tmp_path / "bench" / f"fold{f}" / "pretrain-mae" / "pretrain.json").read_text())["images"]
            for f in range(2)]
    assert sum(seen) == len(fixture_cache)          # 2 folds: each image is a training image exactly once
    # Each SSL arm is compared with the random start, and so is baseline (Δ = baseline − probe-random).
    assert res.comparisons["mae+improved"].names == ("probe-random", "mae+improved")
    assert res.comparisons["baseline"].names == ("probe-random", "baseline")
    md = (tmp_path / "bench" / "results.md").read_text()
    assert "| mae+improved |" in md and "Δ mean F1 vs probe-random" in md and "| mae |" in md   # + its probe row
    # The SSL arm's fine-tune started from that fold's backbone: MAE's sin-cos positions (values up
    # to 1) survive one fine-tuning epoch almost unchanged; a random start (std 0.02) would be ~1 away.
    start = load_file(str(tmp_path / "bench" / "fold0" / "pretrain-mae" / "backbone.safetensors"))
    tuned = load_file(str(tmp_path / "bench" / "fold0" / "mae+improved" / "run" / "model.safetensors"))
    assert (tuned["pos_embed"] - start["pos_embed"]).abs().max() < 0.05
    assert start["pos_embed"].abs().max() > 0.5

    # A finished stage is reused when only how it is watched changes, even from an identity.yaml that recorded
    # the monitor (the rule before): nothing re-trains, and the table is the same.
    import yaml
    from cxrvit.experiments.identity import field_identity
    from cxrvit.experiments.plan import pretrain_config
    ident_file = tmp_path / "bench" / "identity.yaml"
    saved = yaml.safe_load(ident_file.read_text())
    saved["pretrain"]["mae"]["config"] = field_identity(pretrain_config(plan.pretrain["mae"]))
    assert "probe" in saved["pretrain"]["mae"]["config"]
    ident_file.write_text(yaml.safe_dump(saved))
    before = (tmp_path / "bench" / "fold0" / "pretrain-mae" / "backbone.safetensors").stat().st_mtime_ns
    watched = replace(plan, pretrain={"mae": replace(plan.pretrain["mae"], overrides=MAE + ["probe.k=2",
                                                                                           "engine.log_every=7"])})
    again = run_arms(watched, fixture_cache.root, tmp_path / "bench", cache=fixture_cache, n_resamples=20,
                     progress=False, log=lambda s: None)
    assert (tmp_path / "bench" / "fold0" / "pretrain-mae" / "backbone.safetensors").stat().st_mtime_ns == before
    assert again.arms == res.arms and again.scores["mae+improved"].n_images == len(fixture_cache)
    longer = replace(plan, pretrain={"mae": replace(plan.pretrain["mae"], overrides=MAE + ["schedule.epochs=2"])})
    with pytest.raises(ValueError, match="schedule.epochs"):
        run_arms(longer, fixture_cache.root, tmp_path / "bench", cache=fixture_cache, n_resamples=20,
                 progress=False, log=lambda s: None)
