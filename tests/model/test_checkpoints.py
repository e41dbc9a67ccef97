"""load_backbone: checkpoints fabricated in each foreign layout land tensor by tensor where they belong.

Every checkpoint here is built from a random model, renamed and wrapped the way the other project
saves it (DINO main_dino.py, MAE main_pretrain/main_finetune, I-JEPA train.py, timm). Nothing is
downloaded.
"""
from __future__ import annotations

import argparse
import copy

import pytest
import torch
from safetensors.torch import save_file

from cxrvit.data.preprocess import Preprocessing
from cxrvit.inference.bundle import save_bundle
from cxrvit.model.checkpoints import CheckpointError, load_backbone, load_init_backbone, strip_prefixes
from cxrvit.model.vit import VisionTransformer, dino_resample_pos_embed, vit_small

HEAD = ("head.weight", "head.bias")


class NotAllowed:
    """An arbitrary pickled class: loading must refuse it."""

    def __init__(self):
        self.payload = "anything"


def narrow(seed: int, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(embed_dim=48, depth=2, num_heads=3, **kw)


def backbone_state(model: VisionTransformer) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if k not in HEAD}


def dino_head(prefix: str, dim: int) -> dict:
    return {f"{prefix}head.mlp.0.weight": torch.randn(64, dim), f"{prefix}head.mlp.0.bias": torch.randn(64),
            f"{prefix}head.last_layer.weight_g": torch.ones(100, 1), f"{prefix}head.last_layer.weight_v": torch.randn(100, 64)}


# -- fabricators: source backbone state -> checkpoint object in the other project's layout --------
def fab_dino(state):
    return dict(state)


def fab_dino_train(state, student_state=None):
    dim = state["cls_token"].shape[-1]
    student_state = student_state if student_state is not None else {k: v + 1 for k, v in state.items()}
    return {
        "student": {**{f"module.backbone.{k}": v for k, v in student_state.items()}, **dino_head("module.", dim)},
        "teacher": {**{f"backbone.{k}": v for k, v in state.items()}, **dino_head("", dim)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100, "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536),
        "dino_loss": {"center": torch.zeros(1, 100)},
    }


def fab_mae(state):
    dim = state["cls_token"].shape[-1]
    decoder = {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, dim),
               "decoder_embed.bias": torch.zeros(32), "decoder_pos_embed": torch.randn(1, 197, 32),
               "decoder_blocks.0.norm1.weight": torch.ones(32), "decoder_norm.weight": torch.ones(32),
               "decoder_pred.weight": torch.randn(768, 32)}
    return {"model": {**state, **decoder}, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799,
            "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_small", mask_ratio=0.75)}


def fab_mae_finetune(state):
    model = {k: v for k, v in state.items() if not k.startswith("norm.")}
    model["fc_norm.weight"], model["fc_norm.bias"] = state["norm.weight"], state["norm.bias"]
    model["head.weight"], model["head.bias"] = torch.randn(1000, state["cls_token"].shape[-1]), torch.randn(1000)
    return {"model": model, "epoch": 99, "args": argparse.Namespace(global_pool=True)}


def fab_ijepa(state):
    enc = {k: v for k, v in state.items() if k != "cls_token"}
    enc["pos_embed"] = state["pos_embed"][:, 1:].clone()  # I-JEPA: no CLS token, 196 positions
    online = {f"module.{k}": v + 1 for k, v in enc.items()}
    return {"encoder": online, "target_encoder": {f"module.{k}": v for k, v in enc.items()},
            "predictor": {"module.predictor_embed.weight": torch.randn(8, 8)}, "opt": {"state": {}, "param_groups": []},
            "scaler": None, "epoch": 300, "loss": 0.12, "batch_size": 128, "world_size": 16, "lr": 1e-3}


def fab_timm(state):
    dim = state["cls_token"].shape[-1]
    return {**state, "head.weight": torch.randn(1000, dim), "head.bias": torch.randn(1000)}


FABRICATORS = {"dino": fab_dino, "dino-train": fab_dino_train, "mae": fab_mae, "mae-ft": fab_mae_finetune,
               "ijepa": fab_ijepa, "timm": fab_timm}
LAYOUT = {"mae-ft": "mae"}


def check_landed(model: VisionTransformer, src: dict, layout: str) -> None:
    """Every source tensor is in the right place; I-JEPA's padded CLS slot is zero."""
    got = model.state_dict()
    for k, v in src.items():
        if layout == "ijepa" and k == "cls_token":
            continue
        if layout == "ijepa" and k == "pos_embed":
            assert torch.equal(got[k][:, 1:], v[:, 1:]) and torch.all(got[k][:, 0] == 0)
            continue
        assert torch.equal(got[k], v), f"{layout}: {k} did not land"


@pytest.mark.parametrize("name", list(FABRICATORS))
def test_layouts_land_tensor_by_tensor(name, tmp_path):
    """A narrow ViT with DINO's geometry (224 px, patch 16: 196 + 1 tokens) keeps this fast."""
    src = backbone_state(narrow(0))
    path = tmp_path / f"{name}.pth"
    torch.save(FABRICATORS[name](src), path)
    model, report = load_backbone(path, narrow(1, num_classes=3), strict=True)
    assert report.layout == LAYOUT.get(name, name)
    assert report.missing == [] and report.unexpected == []
    check_landed(model, src, report.layout)
    if name == "dino-train":
        assert report.source == "teacher" and any(k.startswith("head.last_layer") for k in report.dropped)
    if name == "mae":
        assert "mask_token" in report.dropped and any(k.startswith("decoder_blocks") for k in report.dropped)
    if name == "mae-ft":
        assert any("pool by the mean" in n for n in report.notes)
    if name == "ijepa":
        assert report.source == "target_encoder" and any("cls_token initialised" in n for n in report.notes)
        assert abs(model.cls_token.std().item() - 0.02) < 0.005
    if name == "timm":
        assert "head.weight" in report.dropped
    assert report.layout in report.summary()


@pytest.fixture(scope="module")
def full_vit_small():
    torch.manual_seed(0)
    return vit_small(num_classes=3)  # built once: DINO's init of 22M parameters takes seconds on 2 cores


@pytest.mark.parametrize("name", ["dino-train", "ijepa"])
def test_full_vit_small_checkpoint(name, tmp_path, full_vit_small):
    src = backbone_state(full_vit_small)
    torch.save(FABRICATORS[name](src), tmp_path / "full.pth")
    target = copy.deepcopy(full_vit_small)
    for p in target.parameters():
        p.data.zero_()
    model, report = load_backbone(tmp_path / "full.pth", target, strict=True)
    assert report.layout == name and len(model.state_dict()) == 152
    check_landed(model, src, name)


def test_dino_student_and_ijepa_online_encoder_on_request(tmp_path):
    src = backbone_state(narrow(0))
    student = backbone_state(narrow(1))
    torch.save(fab_dino_train(src, student), tmp_path / "d.pth")
    model, report = load_backbone(tmp_path / "d.pth", narrow(2), prefer="student")
    assert report.source == "student"
    check_landed(model, student, "dino-train")


def test_state_dict_only_and_head_handling(tmp_path):
    src_model = narrow(0, num_classes=4)
    torch.save(src_model.state_dict(), tmp_path / "with_head.pth")
    state, report = load_backbone(tmp_path / "with_head.pth")
    assert "head.weight" not in state and any("head keys not loaded" in n for n in report.notes)
    # any num_classes: the head is left as initialised
    target = narrow(5, num_classes=7)
    head_before = target.head.weight.clone()
    load_backbone(tmp_path / "with_head.pth", target, strict=True)
    assert torch.equal(target.head.weight, head_before)
    assert torch.equal(target.blocks[1].mlp.fc2.weight, src_model.blocks[1].mlp.fc2.weight)
    # head=True loads it when shapes match, and names both shapes when they do not
    same = narrow(6, num_classes=4)
    load_backbone(tmp_path / "with_head.pth", same, head=True, strict=True)
    assert torch.equal(same.head.weight, src_model.head.weight)
    with pytest.raises(CheckpointError, match=r"'head.weight'.*\(4, 48\).*\(7, 48\)"):
        load_backbone(tmp_path / "with_head.pth", narrow(7, num_classes=7), head=True)


def test_cxrvit_bundle_and_safetensors(tmp_path):
    src_model = narrow(0, num_classes=2)
    save_bundle(tmp_path / "run", src_model, ["Atelectasis", "Effusion"], {"Atelectasis": 0.3, "Effusion": 0.4},
                Preprocessing(size=32), arch="vit_tiny")
    model, report = load_backbone(tmp_path / "run", narrow(1), strict=True)
    assert report.layout == "cxrvit"
    check_landed(model, backbone_state(src_model), "cxrvit")
    save_file(backbone_state(src_model), str(tmp_path / "plain.safetensors"))
    model, report = load_backbone(tmp_path / "plain.safetensors", narrow(2), strict=True)
    assert report.layout == "dino"
    check_landed(model, backbone_state(src_model), "dino")


def test_pretraining_run_folder_loads_its_backbone(tmp_path):
    src_model = narrow(0)
    (tmp_path / "ssl-run").mkdir()
    save_file(backbone_state(src_model), str(tmp_path / "ssl-run" / "backbone.safetensors"))
    model, _ = load_backbone(tmp_path / "ssl-run", narrow(1), strict=True)
    check_landed(model, backbone_state(src_model), "dino")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty.*backbone.safetensors"):
        load_backbone(tmp_path / "empty", narrow(1))


def test_cxrvit_training_checkpoint(tmp_path):
    src = narrow(0, num_classes=15)
    torch.save({"format": "cxrvit-train-checkpoint/1", "model": src.state_dict(), "config": {"seed": 0},
                "optimizer": {"state": {}, "param_groups": []}, "progress": {"epoch": 2}}, tmp_path / "last.pt")
    model, report = load_backbone(tmp_path / "last.pt", narrow(1, num_classes=15), strict=True, head=True)
    assert report.layout == "cxrvit" and report.source == "model"
    check_landed(model, src.state_dict(), "cxrvit")


def test_prefixes_stripped_only_at_start():
    state = {"module.backbone.blocks.0.norm1.weight": 1, "blocks.0.backbone.weight": 2,
             "_orig_mod.module.norm.bias": 3, "xmodule.pos_embed": 4}
    assert strip_prefixes(state) == {"blocks.0.norm1.weight": 1, "blocks.0.backbone.weight": 2,
                                     "norm.bias": 3, "xmodule.pos_embed": 4}


def test_missing_unexpected_and_strict(tmp_path):
    state = backbone_state(narrow(0))
    del state["blocks.1.norm2.bias"]
    state["blocks.9.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "odd.pth")
    model, report = load_backbone(tmp_path / "odd.pth", narrow(1))
    assert report.missing == ["blocks.1.norm2.bias"] and report.unexpected == ["blocks.9.extra.weight"]
    assert "missing 1 keys" in report.summary()
    with pytest.raises(CheckpointError, match=r"odd.pth.*blocks.1.norm2.bias.*blocks.9.extra.weight"):
        load_backbone(tmp_path / "odd.pth", narrow(1), strict=True)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    state = backbone_state(narrow(0))
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(100, 48)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad.pth.*'blocks.0.mlp.fc1.weight'.*\(100, 48\).*\(192, 48\)"):
        load_backbone(tmp_path / "bad.pth", narrow(1))
    with pytest.raises(CheckpointError, match="width mismatch"):
        load_backbone(tmp_path / "bad.pth", VisionTransformer(embed_dim=24, depth=2, num_heads=3))


def test_pos_embed_from_other_resolution_is_resampled(tmp_path):
    src = backbone_state(narrow(0, img_size=448))  # 28 x 28 grid
    assert src["pos_embed"].shape == (1, 785, 48)
    torch.save(fab_dino_train(src), tmp_path / "hires.pth")
    model, report = load_backbone(tmp_path / "hires.pth", narrow(1), strict=True)
    torch.testing.assert_close(model.pos_embed.data, dino_resample_pos_embed(src["pos_embed"], 14, 14))
    assert any("resampled" in n and "784 to 196" in n for n in report.notes)


@pytest.mark.parametrize("size", [128, 448])
def test_a_checkpoint_loaded_at_another_size_is_the_function_it_is_at_that_size(tmp_path, size):
    """Loading resamples the table by the rule the model applies at run time (DINO's), so a 224-px checkpoint
    loaded into a model built for `size` computes what the 224-px model computes on `size`-px inputs. It used to
    resize to a target size, which samples other points: another function of the same weights."""
    source = narrow(0)
    torch.save(backbone_state(source), tmp_path / "b224.pth")
    model, _ = load_backbone(tmp_path / "b224.pth", narrow(1, img_size=size), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), source.forward_features(x), atol=1e-5, rtol=1e-5)


def test_namespace_allowed_other_classes_refused(tmp_path):
    state = backbone_state(narrow(0))
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pth")
    _, report = load_backbone(tmp_path / "ns.pth", narrow(1), strict=True)
    assert report.source == "model"
    torch.save({"model": state, "extra": NotAllowed()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth: refused.*NotAllowed"):
        load_backbone(tmp_path / "evil.pth", narrow(1))


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk.pth: not a PyTorch or safetensors checkpoint \(it starts with"):
        load_backbone(tmp_path / "junk.pth")
    # the usual failed downloads were reported as a security refusal ("it pickles an object that is not a tensor")
    (tmp_path / "page.pth").write_text("<!DOCTYPE html><html><body>Not Found</body></html>")
    with pytest.raises(CheckpointError, match=r"page.pth: not a PyTorch.*an HTML/XML page") as err:
        load_backbone(tmp_path / "page.pth")
    assert "refused" not in str(err.value)
    (tmp_path / "lfs.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 88\n")
    with pytest.raises(CheckpointError, match=r"lfs.pth: .*git-LFS pointer.*git lfs pull"):
        load_backbone(tmp_path / "lfs.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth: .*the file is empty"):
        load_backbone(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_backbone(tmp_path / "absent.pth")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="neither a cxrvit model bundle"):
        load_backbone(tmp_path / "empty_dir")


def test_init_refuses_a_file_with_no_backbone_weight_and_reports_a_partial_one(tmp_path, capsys):
    """A pre-training method's own state_dict (``encoder.*``, ``decoder.*``) loads nothing into the ViT: training
    from it would silently start at random init. Refused, naming the file, its key prefixes and the layouts."""
    src = backbone_state(narrow(0))
    method = {**{f"encoder.{k}": v for k, v in src.items()}, "decoder.embed.weight": torch.zeros(4, 48)}
    torch.save(method, tmp_path / "method_state.pt")
    model = narrow(1, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"method_state.pt: none of its tensors.*encoder\.\* \(\d+\), "
                                              r"decoder\.\* \(1\).*layouts dino, dino-train, mae, ijepa, timm, cxrvit"):
        load_init_backbone(tmp_path / "method_state.pt", model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Some of the backbone: loaded, and what was missing is printed (not on a quiet DDP rank).
    del src["blocks.1.norm2.bias"]
    torch.save(src, tmp_path / "partial.pth")
    report = load_init_backbone(tmp_path / "partial.pth", model)
    assert report.missing == ["blocks.1.norm2.bias"] and torch.equal(model.cls_token.data, src["cls_token"])
    assert "partial.pth: layout dino" in capsys.readouterr().err
    load_init_backbone(tmp_path / "partial.pth", model, quiet=True)
    assert capsys.readouterr().err == ""


def test_saved_weights_are_byte_identical_across_processes(tmp_path):
    """The same tensors and metadata written by two processes give the same file (so its sha256 names its content:
    what `bench arms` pins for an init file). safetensors alone orders its header per process; save_weights sorts
    it in place, and the file still loads with every tensor and the metadata."""
    import hashlib
    import subprocess
    import sys

    from safetensors import safe_open
    from safetensors.torch import load_file

    code = ("import sys, torch; from cxrvit.model.checkpoints import save_weights; torch.manual_seed(0); "
            "state = {f'blocks.{i}.w': torch.randn(3, 5) for i in range(12)} | {'pos_embed': torch.randn(1, 4, 5)}; "
            "meta = {k: f'value of {k}' for k in ('format', 'layout', 'arch', 'depth', 'method', 'source', "
            "'source_sha256', 'step', 'cls_token', 'patch_size')}; save_weights(state, sys.argv[1], meta)")
    paths = [tmp_path / f"w{i}.safetensors" for i in range(3)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True)
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert len(digests) == 1
    loaded = load_file(str(paths[0]))
    torch.manual_seed(0)
    expected = {f"blocks.{i}.w": torch.randn(3, 5) for i in range(12)} | {"pos_embed": torch.randn(1, 4, 5)}
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    with safe_open(str(paths[0]), framework="pt") as f:
        assert f.metadata()["source_sha256"] == "value of source_sha256" and len(f.metadata()) == 10


def test_a_mean_pooling_fine_tune_says_how_to_read_it(tmp_path):
    """The note used to say cxrvit reads the CLS token, so the head needs fine-tuning; model.global_pool=avg reads
    the patch mean the checkpoint was fine-tuned on."""
    torch.save(fab_mae_finetune(backbone_state(narrow(0))), tmp_path / "ft.pth")
    model, report = load_backbone(tmp_path / "ft.pth", narrow(1), strict=True)
    assert any("fc_norm mapped onto norm" in n and "model.global_pool=avg" in n for n in report.notes)
