"""load_bundle on damaged bundles: every problem is a ValueError naming the file, and a command exits 2 with it."""
from __future__ import annotations

import json
import shutil

import pytest

from cxrvit.inference.bundle import META_FILE, WEIGHTS_FILE, load_bundle

from inference_support import factory, run_cli as main


def _truncate_weights(run):
    data = (run / WEIGHTS_FILE).read_bytes()
    (run / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    return run / WEIGHTS_FILE, "unreadable weights"


def _drop_labels(run):
    meta = json.loads((run / META_FILE).read_text())
    del meta["labels"]
    (run / META_FILE).write_text(json.dumps(meta))
    return run / META_FILE, "missing 'labels'"


def _break_json(run):
    (run / META_FILE).write_text('{"labels": ["Effusion"], ')
    return run / META_FILE, "not valid JSON"


def _wrong_model(run):
    meta = json.loads((run / META_FILE).read_text())
    (run / META_FILE).write_text(json.dumps({**meta, "labels": meta["labels"][:3]}))   # the head has 15 rows
    return run / WEIGHTS_FILE, "do not fit the model"


DAMAGE = [_truncate_weights, _drop_labels, _break_json, _wrong_model]


@pytest.fixture()
def damaged(bundle_dir, tmp_path, request):
    run = shutil.copytree(bundle_dir, tmp_path / "run")
    path, message = request.param(run)
    return run, path, message


@pytest.mark.parametrize("damaged", DAMAGE, indirect=True, ids=lambda f: f.__name__)
def test_a_damaged_bundle_is_a_value_error_naming_the_file(damaged):
    run, path, message = damaged
    with pytest.raises(ValueError, match=message) as exc:
        load_bundle(run)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("damaged", DAMAGE, indirect=True, ids=lambda f: f.__name__)
def test_predict_exits_2_naming_the_damaged_file(damaged, tmp_path, capsys):
    run, path, message = damaged
    factory.make_dicom(tmp_path / "a.dcm")
    assert main(["predict", "--model", str(run), str(tmp_path / "a.dcm"), "--out", str(tmp_path / "p.csv"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err and "Traceback" not in err
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("kwargs", [{"img_size": 128}, {"patch_size": 8, "img_size": 64}, {}],
                         ids=["img128", "patch8", "default"])
def test_a_bundle_of_any_size_loads_as_the_model_it_was_saved_from(tmp_path, kwargs):
    """bundle.json did not record the stored grid or the patch, nor the arch unless told: a vit_tiny built at
    128 px, or with patch 8, was saved as a bundle that load_bundle then refused."""
    import torch

    from cxrvit.data.preprocess import Preprocessing
    from cxrvit.inference.bundle import save_bundle
    from cxrvit.model.vit import vit_tiny

    torch.manual_seed(0)
    model = vit_tiny(num_classes=2, **kwargs).eval()
    save_bundle(tmp_path / "b", model, ["Effusion", "Atelectasis"], {"Effusion": 0.5, "Atelectasis": 0.5},
                Preprocessing(size=kwargs.get("img_size", 224)))
    meta = json.loads((tmp_path / "b" / META_FILE).read_text())
    assert meta["arch"] == "vit_tiny" and meta["img_size"] == kwargs.get("img_size", 224)
    bundle = load_bundle(tmp_path / "b")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), model(x))


def test_predict_proba_refuses_images_it_would_misread(bundle_dir):
    """uint8 is read as 0..255 and a float as 0..1: a float picture in 0..255, or raw 16-bit values, used to be
    scored as a washed-out image without a word, and a [N, S, S] batch failed inside torch."""
    import torch

    bundle = load_bundle(bundle_dir)
    grey = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(bundle.predict_proba(grey), bundle.predict_proba(grey.float() / 255))
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\], these span 0 to 25\d"):
        bundle.predict_proba(grey.float())
    with pytest.raises(ValueError, match=r"torch.int32 images: pass uint8"):
        bundle.predict_proba(grey.int() * 16)
    with pytest.raises(ValueError, match=r"expected grey images \[N, 1, S, S\], got shape \(2, 64, 64\)"):
        bundle.predict_proba(grey[:, 0])
