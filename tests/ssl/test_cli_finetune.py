"""End to end on a real prepared cache: `cxrvit pretrain` -> backbone (the SSL arms: tests/experiments/test_ssl_arms.py)."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
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
               "--half", str(tmp_path / "ship" / "half.safetensors"), *sum((["--set", s] for s in TINY), [])])
    assert rc == 0
    summary = json.loads((run / "pretrain.json").read_text())
    n_train_val = int((fixture_cache.index["official_split"] != "test").sum())
    assert summary["images"] == n_train_val            # official test images are not pre-trained on
    assert summary["probes"] and "knn_cls_auroc" in summary["probes"][-1]

    backbone = run / "backbone.safetensors"
    model, report = load_backbone(backbone, vit_tiny(), strict=True)
    assert torch.equal(model.blocks[0].attn.qkv.weight, load_file(str(backbone))["blocks.0.attn.qkv.weight"])

    # --half: the float16 copy the repository ships -- every tensor the float32 one rounded, its source named
    half = tmp_path / "ship" / "half.safetensors"
    full, small = load_file(str(backbone)), load_file(str(half))
    assert full.keys() == small.keys() and all(v.dtype == torch.float16 for v in small.values())
    assert all(torch.equal(small[k], full[k].half()) for k in full)
    with safe_open(str(half), framework="pt") as f:
        meta = f.metadata()
    assert meta["source_sha256"] == hashlib.sha256(backbone.read_bytes()).hexdigest() and meta["method"] == "mae"
    halved, _ = load_backbone(half, vit_tiny(), strict=True)           # loads back as float32
    assert halved.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert torch.equal(halved.blocks[0].attn.qkv.weight, full["blocks.0.attn.qkv.weight"].half().float())


def test_half_copy_refuses_values_float16_cannot_hold(tmp_path):
    from safetensors.torch import save_file

    from cxrvit.ssl.encoder import write_half_copy

    save_file({"w": torch.tensor([1.0, 7e4])}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"b.safetensors: w holds values beyond float16"):
        write_half_copy(tmp_path / "b.safetensors", tmp_path / "h.safetensors")
    assert not (tmp_path / "h.safetensors").exists()


def test_pretrain_cli_names_a_bad_override(fixture_cache, tmp_path, capsys):
    rc = main(["pretrain", "--method", "dino", "--data", str(fixture_cache.root), "--out", str(tmp_path / "r"),
               "--set", "dino.n_locals=3"])
    assert rc == 2
    assert "dino.n_locals" in capsys.readouterr().err
