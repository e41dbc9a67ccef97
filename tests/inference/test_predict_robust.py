"""``cxrvit predict`` keeps going and keeps what it did: any per-file failure is that file's row, an unusable
``--out`` fails before scoring, rows reach the output batch by batch, and Ctrl-C leaves a readable file."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cxrvit.inference import predict as predict_mod
from cxrvit.inference.predict import Prediction, PredictionWriter, predict_files, write_predictions

from inference_support import factory, run_cli as main


@pytest.fixture()
def three(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    real = factory.real_pixels()
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        Image.fromarray(np.roll(real, 5 * i, axis=1).copy()).save(d / name)
    return [d / "a.png", d / "b.png", d / "c.png"]


def _fail_on(monkeypatch, name: str, exc: BaseException):
    real = predict_mod.images.read_grey_info

    def read(path):
        if path.name == name:
            raise exc
        return real(path)

    monkeypatch.setattr(predict_mod.images, "read_grey_info", read)


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("decoder bug"), KeyError("x")])
def test_any_failure_of_one_file_is_that_files_error_row(bundle, three, monkeypatch, exc):
    _fail_on(monkeypatch, "b.png", exc)
    rows = predict_files(bundle, three, batch_size=2, progress=False)
    assert [r.status for r in rows] == ["ok", "error", "ok"]
    assert str(three[1]) in rows[1].error and type(exc).__name__ in rows[1].error and rows[1].probs == {}
    if isinstance(exc, MemoryError):
        assert "not enough memory" in rows[1].error


def test_unwritable_out_fails_before_scoring(bundle_dir, three, tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    called = []
    monkeypatch.setattr(predict_mod, "predict_files", lambda *a, **k: called.append(1) or [])
    assert main(["predict", "--model", str(bundle_dir), *map(str, three), "--out", str(tmp_path / "afile" / "p.csv"),
                 "--no-progress"]) == 2
    assert called == [] and "--out" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_ctrl_c_keeps_the_rows_already_scored(bundle_dir, three, tmp_path, monkeypatch, suffix):
    real, calls = predict_mod.score_batch, []

    def score(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(predict_mod, "score_batch", score)
    out = tmp_path / f"p{suffix}"
    assert main(["predict", "--model", str(bundle_dir), *map(str, three), "--out", str(out), "--batch-size", "1",
                 "--no-progress"]) == 130
    if suffix == ".csv":
        with open(out) as fh:
            table = list(csv.DictReader(fh))
    else:
        table = json.loads(out.read_text())["predictions"]  # a whole JSON document, ended on the way out
    assert [(r["path"], r["status"]) for r in table] == [(str(three[0]), "ok")]


def test_rows_reach_the_file_as_each_batch_finishes(bundle, three, tmp_path):
    out = tmp_path / "p.csv"
    seen = []
    with PredictionWriter(out, bundle.labels) as writer:
        def write(rows):
            writer.write(rows)
            seen.append(len(out.read_text().splitlines()) - 1)  # flushed: on disk already

        predict_files(bundle, three, batch_size=1, progress=False, on_rows=write)
    assert seen == [1, 2, 3]


def _rows(labels):
    return [Prediction("/x/a.png", qc_flags=["low_resolution:10x10<32", "auto_inverted"],
                       probs={k: 0.25 + i / 100 for i, k in enumerate(labels)}, findings=[labels[0]]),
            Prediction("/x/b \"q\".png", status="error", error="/x/b.png: empty file"),
            Prediction("/x/c.png", probs={k: 0.5 for k in labels})]


@pytest.mark.parametrize("n", [0, 1, 3])
def test_output_format_is_unchanged(tmp_path, n):
    labels = ["Atelectasis", "Mass/Nodule"]
    rows = _rows(labels)[:n]
    got = write_predictions(rows, labels, tmp_path / "p.json").read_text()
    assert got == json.dumps({"labels": labels, "predictions": [r.to_dict() for r in rows]}, indent=2)
    with PredictionWriter(tmp_path / "q.json", labels) as w:  # written a row at a time: the same document
        for r in rows:
            w.write([r])
    assert (tmp_path / "q.json").read_text() == got
    with open(write_predictions(rows, labels, tmp_path / "p.csv"), newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["path", "status", "error", "qc_flags", "prob_Atelectasis", "prob_Mass/Nodule", "findings"]
    expected = [[r.path, r.status, r.error, ";".join(r.qc_flags),
                 *[f"{r.probs[k]:.6f}" if k in r.probs else "" for k in labels], ";".join(r.findings)] for r in rows]
    assert table[1:] == expected
