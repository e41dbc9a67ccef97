"""End to end on a real prepared cache: `cxrvit pretrain` -> backbone; the SSL benchmark fine-tunes it."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cxrvit.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nih"
TINY = ["model.arch=vit_tiny", "model.depth=12", "schedule.epochs=1", "schedule.batch_size=4",
        "engine.precision=fp32", "engine.log_every=1", "probe.size=32", "probe.k=3", "probe.batch_size=8",
        "mae.size=32", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2", "mae.mask_ratio=0.75"]


@pytest.fixture(scope="module")
def fixture_cache(tmp_path_factory):
    from cxrvit.data.cache import prepare_cache

    return prepare_cache(FIXTURES, tmp_path_factory.mktemp("ssl") / "cache", 32, workers=1, progress=False,
                         log=lambda *a: None)


def test_pretrain_cli_exports_a_strict_backbone(fixture_cache, tmp_path, capsys):
    from cxrvit.model.checkpoints import load_backbone
    from cxrvit.model.vit import vit_tiny

    run = tmp_path / "mae"
    rc = main(["pretrain", "--method", "mae", "--data", str(fixture_cache.root), "--out", str(run), "--quiet",
               *sum((["--set", s] for s in TINY), [])])
    assert rc == 0
    summary = json.loads((run / "pretrain.json").read_text())
    n_train_val = int((fixture_cache.index["official_split"] != "test").sum())
    assert summary["images"] == n_train_val            # official test images are not pre-trained on
    assert summary["probes"] and "knn_cls_auroc" in summary["probes"][-1]

    backbone = run / "backbone.safetensors"
    model, report = load_backbone(backbone, vit_tiny(), strict=True)
    assert torch.equal(model.blocks[0].attn.qkv.weight, load_file(str(backbone))["blocks.0.attn.qkv.weight"])


def test_pretrain_cli_names_a_bad_override(fixture_cache, tmp_path, capsys):
    rc = main(["pretrain", "--method", "dino", "--data", str(fixture_cache.root), "--out", str(tmp_path / "r"),
               "--set", "dino.n_locals=3"])
    assert rc == 2
    assert "dino.n_locals" in capsys.readouterr().err


def test_ssl_bench_pools_every_arm_on_the_same_folds(fixture_cache, tmp_path):
    from cxrvit.ssl.bench import run_ssl_bench

    ft = ["model.arch=vit_tiny", "model.img_size=32", "schedule.epochs=1", "schedule.batch_size=4",
          "engine.precision=fp32", "eval.batch_size=8"]
    ssl = [s for s in TINY if not s.startswith("probe")] + ["probe.size=32", "probe.k=3"]
    res = run_ssl_bench(fixture_cache.root, tmp_path / "bench", methods=["mae"], folds=2, ssl_overrides=ssl,
                        finetune_overrides=ft, n_resamples=20, probe=False, cache=fixture_cache, log=lambda s: None)
    assert res.arms == ["baseline", "improved", "mae+improved"]
    assert all(res.scores[a].n_images == len(fixture_cache) for a in res.arms)
    # Pre-training saw the training folds only: fewer images than the cache, once per fold.
    seen = [json.loads((tmp_path / "bench" / f"fold{f}" / "pretrain-mae" / "pretrain.json").read_text())["images"]
            for f in range(2)]
    assert sum(seen) == len(fixture_cache)          # 2 folds: each image is a training image exactly once
    md = (tmp_path / "bench" / "results.md").read_text()
    assert "**mae+improved vs improved**" in md and "**improved vs baseline**" in md
    # The SSL arm's fine-tune started from that fold's backbone: MAE's sin-cos positions (values up
    # to 1) survive one fine-tuning epoch almost unchanged; a random start (std 0.02) would be ~1 away.
    start = load_file(str(tmp_path / "bench" / "fold0" / "pretrain-mae" / "backbone.safetensors"))
    tuned = load_file(str(tmp_path / "bench" / "fold0" / "mae+improved" / "run" / "model.safetensors"))
    assert (tuned["pos_embed"] - start["pos_embed"]).abs().max() < 0.05
    assert start["pos_embed"].abs().max() > 0.5
