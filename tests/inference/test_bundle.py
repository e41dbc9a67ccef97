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
