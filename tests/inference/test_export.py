"""cxrvit export: DINO .pth loads strict into an independent DINO vit_small; safetensors; ONNX vs PyTorch."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxrvit.cli import main
from cxrvit.data.preprocess import Preprocessing
import cxrvit.inference.bundle as bundle_module
from cxrvit.inference.bundle import load_bundle, save_bundle
from cxrvit.inference.export import metadata_path, select_labels
from cxrvit.labels import DEFAULT_LABELS
from cxrvit.model.checkpoints import load_backbone, read_export_metadata
from cxrvit.model.vit import VisionTransformer, vit_small

# DINO's own ViT, kept beside the model tests that also check against it.
_spec = importlib.util.spec_from_file_location("dino_reference", Path(__file__).resolve().parents[1] / "model/dino_reference.py")
_dino_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_dino_reference)
dino_vit_small = _dino_reference.dino_vit_small

CHOSEN = ["Atelectasis", "Effusion", "Mass/Nodule"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One OpenMP thread for this module's ViT-S passes, as tests/model/conftest.py sets (it says why)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_bundle(directory, model, size):
    thresholds = {name: 0.1 + 0.01 * i for i, name in enumerate(DEFAULT_LABELS)}
    arch = "vit_small" if model.embed_dim == 384 else "vit_tiny"
    return save_bundle(directory, model, list(DEFAULT_LABELS), thresholds, Preprocessing(size=size), arch=arch,
                       threshold_source={"split": "val", "images": ["a.png"]})


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    torch.manual_seed(0)
    model = vit_small(num_classes=len(DEFAULT_LABELS))
    torch.nn.init.normal_(model.head.bias)  # distinct rows, so a wrong row choice shows
    return make_bundle(tmp_path_factory.mktemp("run_s"), model, 224), model.eval()


@pytest.fixture(scope="module")
def dino_export(small_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.pth"
    rc = main(["export", "--model", str(small_run[0]), "--format", "dino", "--labels", ",".join(CHOSEN), "--out", str(out)])
    assert rc == 0
    return out


def test_dino_export_loads_strict_into_independent_dino(small_run, dino_export):
    state = torch.load(dino_export, map_location="cpu", weights_only=True)
    assert type(state) is dict and len(state) == 152 and state["head.weight"].shape == (3, 384)
    ref = dino_vit_small(num_classes=3).eval()
    ref.load_state_dict(state, strict=True)
    run, model = small_run
    bundle_meta = json.loads((run / "bundle.json").read_text())
    pre = Preprocessing.from_dict(bundle_meta["preprocessing"])
    x = pre.normalize(torch.randint(0, 256, (2, 1, 224, 224), dtype=torch.uint8))
    cols = [DEFAULT_LABELS.index(c) for c in CHOSEN]
    with torch.no_grad():
        torch.testing.assert_close(ref.head(ref(x)), model(x)[:, cols], atol=1e-5, rtol=1e-5)
    meta = json.loads(metadata_path(dino_export).read_text())
    assert metadata_path(dino_export).name == "model.pth.json"
    assert meta["labels"] == CHOSEN and meta["layout"] == "dino"
    assert meta["thresholds"] == {c: bundle_meta["thresholds"][c] for c in CHOSEN}
    exported = meta["preprocessing"]
    assert exported["input_size"] == [224, 224] and exported["mean"] == list(pre.mean)
    assert exported["std"] == list(pre.std) and exported["channels"] == "grey-repeated-to-3"


def test_safetensors_export_matches_dino_export(small_run, dino_export, tmp_path):
    out = tmp_path / "model.safetensors"
    assert main(["export", "--model", str(small_run[0]), "--format", "safetensors", "--labels", ",".join(CHOSEN),
                 "--out", str(out)]) == 0
    tensors, reference = load_file(str(out)), torch.load(dino_export, weights_only=True)
    assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in tensors)
    meta = read_export_metadata(out)
    assert meta["labels"] == CHOSEN and meta["preprocessing"]["input_size"] == [224, 224]
    # and cxrvit reads its own export back strictly, head included
    target = copy.deepcopy(small_run[1])  # a ViT-S without paying DINO's init again
    target.head = torch.nn.Linear(384, 3)
    _, report = load_backbone(out, target, strict=True, head=True)
    assert report.layout == "cxrvit" and torch.equal(target.head.weight, tensors["head.weight"])


def test_unknown_label_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bundle_module, "build_model", one_block)
    run = make_bundle(tmp_path / "run_t", one_block(num_classes=len(DEFAULT_LABELS)), 32)
    rc = main(["export", "--model", str(run), "--format", "dino", "--labels", "Effusion,Cardiomegally",
               "--out", str(tmp_path / "x.pth")])
    assert rc == 2 and "Cardiomegally" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


def test_side_files_of_two_formats_differ_and_never_overwrite_the_weights(tmp_path, capsys, monkeypatch):
    # model.pth and model.onnx used to share model.json; --out x.json wrote the metadata over the weights.
    assert metadata_path(tmp_path / "model.pth") != metadata_path(tmp_path / "model.onnx")
    assert metadata_path(tmp_path / "model.onnx").name == "model.onnx.json"
    monkeypatch.setattr(bundle_module, "build_model", one_block)
    run = make_bundle(tmp_path / "run_t", one_block(num_classes=len(DEFAULT_LABELS)), 32)
    out = tmp_path / "x.json"
    assert main(["export", "--model", str(run), "--format", "dino", "--labels", "Effusion", "--out", str(out)]) == 0
    assert torch.load(out, weights_only=True)["head.weight"].shape == (1, 192)   # still the weights
    assert json.loads((tmp_path / "x.json.json").read_text())["labels"] == ["Effusion"]
    assert "x.json.json" in capsys.readouterr().out
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert main(["export", "--model", str(run), "--format", "onnx", "--out", str(folder)]) == 2
    assert f"{folder}: --out must name a file" in capsys.readouterr().err


def test_select_labels_keeps_requested_order():
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=24, depth=1, num_heads=2, num_classes=4)
    state, chosen = select_labels(model, ["a", "b", "c", "d"], ["d", "b"])
    assert chosen == ["d", "b"]
    assert torch.equal(state["head.weight"], model.head.weight[[3, 1]])
    assert torch.equal(state["head.bias"], model.head.bias[[3, 1]])
    with pytest.raises(ValueError, match="duplicates"):
        select_labels(model, ["a", "b", "c", "d"], ["a", "a"])


def one_block(arch="vit_tiny", num_classes=0, global_pool="token", n_last_blocks=1, **kw):
    """A ViT-Tiny with as few blocks as the read-out needs: the ONNX exporter costs seconds per block."""
    return VisionTransformer(embed_dim=192, depth=n_last_blocks, num_heads=3, num_classes=num_classes,
                             global_pool=global_pool, n_last_blocks=n_last_blocks)


def test_a_bundle_with_an_unknown_read_out_names_its_file(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_module, "build_model", one_block)
    run = make_bundle(tmp_path / "run", one_block(num_classes=len(DEFAULT_LABELS)), 32)
    meta = json.loads((run / "bundle.json").read_text())
    assert meta["global_pool"] == "token"
    (run / "bundle.json").write_text(json.dumps({**meta, "global_pool": "max"}))
    with pytest.raises(ValueError, match=r"bundle\.json: unknown global_pool 'max'"):
        load_bundle(run)


@pytest.mark.parametrize("pool,blocks", [("token", 1), ("avg", 1), ("avg", 2), ("avgmax", 1),
                                        ("token+avg", 1)])
def test_onnx_export_dynamic_batch_and_size_matches_torch(tmp_path, monkeypatch, pool, blocks):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(bundle_module, "build_model", one_block)  # load_bundle builds the 1-block model
    torch.manual_seed(0)
    run = make_bundle(tmp_path / "run_t", one_block(num_classes=len(DEFAULT_LABELS), global_pool=pool,
                                                       n_last_blocks=blocks), 32)
    out = tmp_path / "model.onnx"
    assert main(["export", "--model", str(run), "--format", "onnx", "--labels", ",".join(CHOSEN),
                 "--dynamic-size", "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "model.onnx.json").read_text())
    assert meta["labels"] == CHOSEN and meta["onnx"]["max_abs_diff_vs_torch"] < 1e-4
    assert meta["read_out"] == {"global_pool": pool, "n_last_blocks": blocks}
    assert meta["onnx"]["checked_sizes"] == [[32, 32], [64, 48]]
    # our own check: other batch sizes and non-square multiple-of-16 sizes
    bundle = load_bundle(run)
    # the read-out travels in bundle.json (no weight says it)
    assert bundle.model.global_pool == pool and bundle.model.n_last_blocks == blocks
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    cols = [bundle.labels.index(c) for c in CHOSEN]
    for b, h, w in [(1, 32, 32), (5, 48, 32), (2, 224, 224)]:
        grey = torch.randint(0, 256, (b, 1, h, w), dtype=torch.uint8)
        logits, probs = session.run(None, {"grey": (grey.float() / 255).numpy()})
        with torch.no_grad():
            ref = bundle.model(bundle.preprocessing.normalize(grey))[:, cols]
        assert logits.shape == (b, 3)
        np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4)
        np.testing.assert_allclose(probs, torch.sigmoid(ref).numpy(), atol=1e-5)


@pytest.mark.parametrize("gh, gw", [(6, 6), (8, 8), (28, 28), (14, 14), (14, 20), (20, 28)])
def test_the_graphs_position_resampling_is_the_models(gh, gw):
    """The dynamic-size ONNX graph resamples the position table by matrix products (so the grid stays symbolic);
    they must give the torch model's DINO resampling, the stored table itself at the stored side."""
    from cxrvit.inference.export import symbolic_dino_resample
    from cxrvit.model.vit import vit_small

    torch.manual_seed(0)
    model = vit_small()
    with torch.no_grad():
        model.pos_embed.normal_()
        want = model.interpolate_pos_encoding(torch.zeros(1, 1 + gh * gw, 384), 16 * gh, 16 * gw)
        got = symbolic_dino_resample(model.pos_embed, gh, gw)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
