"""cxrvit predict: inputs, per-file errors, QC flags, outputs, exit codes."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cxrvit.data import images
from cxrvit.data.images import load_square
from cxrvit.data.preprocess import center_zoom, eval_transform, to_float
from cxrvit.inference.predict import collect_inputs, load_for_model, predict_files, write_predictions

from inference_support import SHARED, THRESHOLDS, factory, run_cli as main


@pytest.fixture()
def folder(tmp_path):
    """Good PNGs and DICOMs mixed with broken files, in nested folders."""
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    real = factory.real_pixels()
    Image.fromarray(real).save(d / "a.png")
    Image.fromarray(real[:, ::-1].copy()).save(d / "sub" / "b.jpg", quality=95)
    factory.make_dicom(d / "sub" / "c.dcm", implicit=True)
    factory.make_dicom(d / "ot_object", modality="OT", body_part=None, view=None)  # no extension: sniffed
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes((d / "a.png").read_bytes()[:200])
    (d / "text.png").write_text("not an image")
    (d / "notes.csv").write_text("x,y\n")                # not an image, not image-named: skipped
    (d / ".hidden.png").write_bytes(b"")                  # hidden: skipped
    return d


def test_collect_inputs_walks_folders_and_lists(folder, tmp_path):
    files = collect_inputs([folder])
    names = sorted(p.name for p in files)
    assert names == ["a.png", "b.jpg", "c.dcm", "empty.png", "ot_object", "text.png", "truncated.png"]
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nin/a.png\n\n" + str(folder / "sub" / "c.dcm") + "\nin/missing.png\n")
    listed = collect_inputs([listing, folder / "a.png"])  # duplicates removed, order kept
    assert [p.name for p in listed] == ["a.png", "c.dcm", "missing.png"]


def test_a_list_that_is_not_utf8_text_is_an_error_naming_it(bundle_dir, folder, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text(str(folder / "a.png") + "\n", encoding="utf-16")  # Windows Notepad's "Unicode"
    with pytest.raises(ValueError, match=r"list\.txt: cannot read this list of paths"):
        collect_inputs([listing])
    # before any scoring, a message and exit code 2, not a UnicodeDecodeError traceback
    assert main(["predict", "--model", str(bundle_dir), str(listing), "--out", str(tmp_path / "p.csv"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(listing) in err and "cannot read this list of paths" in err


def test_every_file_gets_a_row_and_bad_ones_an_error(bundle, folder, tmp_path):
    paths = collect_inputs([folder]) + [tmp_path / "does-not-exist.png"]
    rows = predict_files(bundle, paths, batch_size=2, progress=False)
    assert [r.path for r in rows] == [str(p) for p in paths]
    status = {r.path.rsplit("/", 1)[-1]: r for r in rows}
    for bad, reason in [("empty.png", "empty file"), ("truncated.png", "truncated"),
                        ("text.png", "not a PNG, JPEG or DICOM"), ("does-not-exist.png", "cannot read")]:
        assert status[bad].status == "error" and reason in status[bad].error and bad in status[bad].error
        assert status[bad].probs == {}
    for good in ("a.png", "b.jpg", "c.dcm", "ot_object"):
        r = status[good]
        assert r.status == "ok" and set(r.probs) == set(bundle.labels)
        assert r.findings == [k for k in bundle.labels if r.probs[k] >= THRESHOLDS[k]]
    assert status["ot_object"].qc_flags == ["not_radiograph:OT"]
    assert status["a.png"].qc_flags == []  # 64 px for a 32-px model: nothing to flag


def test_probabilities_match_the_bundle_directly(bundle, folder):
    rows = predict_files(bundle, [folder / "a.png", folder / "sub" / "c.dcm"], progress=False)
    square = images.load_square(folder / "a.png", bundle.preprocessing.size)
    direct = bundle.predict_proba(torch.from_numpy(square.copy())[None, None])[0].numpy()
    np.testing.assert_allclose([rows[0].probs[k] for k in bundle.labels], direct, rtol=1e-5, atol=1e-6)
    # The DICOM holds the same pixels as the PNG, so it must score the same.
    np.testing.assert_allclose([rows[1].probs[k] for k in bundle.labels], direct, rtol=1e-5, atol=1e-6)


def test_a_probability_equal_to_its_threshold_is_a_finding_as_evaluation_counts_it(bundle, folder, monkeypatch):
    """Evaluation predicts positive at ``p >= threshold`` (evaluation.metrics); predict must call the finding at
    the same boundary, so a threshold set to an image's exact probability calls it and the next float up does not."""
    (row,) = predict_files(bundle, [folder / "a.png"], progress=False)
    label = bundle.labels[0]
    p = row.probs[label]
    for threshold, called in ((p, True), (float(np.nextafter(p, 1.0)), False)):
        monkeypatch.setitem(bundle.thresholds, label, threshold)
        (again,) = predict_files(bundle, [folder / "a.png"], progress=False)
        assert again.probs[label] == p and (label in again.findings) is called


def test_decompression_bomb_guard(bundle, folder):
    rows = predict_files(bundle, [folder / "a.png", folder / "sub" / "c.dcm"], progress=False, max_pixels=1000)
    assert all(r.status == "error" and "decompression-bomb" in r.error for r in rows)


def test_tta_is_the_validation_pass_that_tuned_the_thresholds(bundle, folder):
    grey = torch.from_numpy(load_square(folder / "a.png", bundle.preprocessing.size).copy())[None, None]
    size = bundle.preprocessing.size
    with torch.no_grad():
        logits = [bundle.model(bundle.preprocessing.normalize(v)).float()
                  for v in (eval_transform(grey, size), center_zoom(to_float(grey), size, 0.9))]
    expected = torch.sigmoid((logits[0] + logits[1]) / 2)[0].numpy()
    tta = predict_files(bundle, [folder / "a.png"], progress=False, tta=True)[0].probs
    np.testing.assert_allclose([tta[k] for k in bundle.labels], expected, rtol=1e-5, atol=1e-6)
    plain = predict_files(bundle, [folder / "a.png"], progress=False)[0].probs
    assert plain != tta  # default: as tuned, and this bundle was tuned without TTA
    bundle.meta.setdefault("training", {})["tta"] = True
    try:
        assert predict_files(bundle, [folder / "a.png"], progress=False)[0].probs == tta
    finally:
        bundle.meta["training"]["tta"] = False


def test_csv_and_json_outputs(bundle, folder, tmp_path):
    rows = predict_files(bundle, [folder / "a.png", folder / "empty.png"], progress=False)
    out = write_predictions(rows, bundle.labels, tmp_path / "p.csv")
    with open(out) as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0])[:4] == ["path", "status", "error", "qc_flags"]
    assert list(table[0])[-1] == "findings" and f"prob_{bundle.labels[0]}" in table[0]
    assert table[0]["status"] == "ok" and float(table[0][f"prob_{bundle.labels[0]}"]) == pytest.approx(
        rows[0].probs[bundle.labels[0]], abs=1e-6)
    assert table[1]["status"] == "error" and table[1][f"prob_{bundle.labels[0]}"] == ""
    doc = json.loads(write_predictions(rows, bundle.labels, tmp_path / "p.json").read_text())
    assert doc["labels"] == bundle.labels and doc["predictions"][1]["error"].endswith("empty file")
    with pytest.raises(ValueError, match="must end in .csv or .json"):
        write_predictions(rows, bundle.labels, tmp_path / "p.txt")


def test_cli_exit_codes_and_heatmaps(bundle_dir, folder, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(folder / "a.png", good / "a.png")
    factory.make_dicom(good / "lat.dcm", view="LL")
    assert main(["predict", "--model", str(bundle_dir), str(good), "--out", str(tmp_path / "ok.csv"),
                 "--heatmaps", str(tmp_path / "hm"), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "hm").iterdir()) == ["a.png", "lat.png"]
    with Image.open(tmp_path / "hm" / "a.png") as im:
        assert im.width > im.height > 100
    with open(tmp_path / "ok.csv") as fh:
        flags = {r["path"].rsplit("/", 1)[-1]: r["qc_flags"] for r in csv.DictReader(fh)}
    assert "lateral_view" in flags["lat.dcm"]
    # one corrupt file among good ones: the good ones are scored, the exit code says 1
    assert main(["predict", "--model", str(bundle_dir), str(good), str(folder / "truncated.png"),
                 "--out", str(tmp_path / "bad.csv"), "--no-progress"]) == 1
    with open(tmp_path / "bad.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["ok", "ok", "error"]
    assert main(["predict", "--model", str(tmp_path), str(good), "--no-progress"]) == 2  # not a bundle


def test_a_heatmaps_folder_that_cannot_be_made_is_an_error_before_scoring(bundle_dir, folder, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    assert main(["predict", "--model", str(bundle_dir), str(folder / "a.png"), "--out", str(tmp_path / "p.csv"),
                 "--heatmaps", str(taken), "--no-progress"]) == 2  # was a FileExistsError traceback
    err = capsys.readouterr().err
    assert f"--heatmaps {taken}" in err and "cannot create" in err


def test_mislabelled_negative_is_flagged_and_reinverted(bundle, tmp_path):
    plain = factory.make_dicom(tmp_path / "plain.dcm")
    relabelled = factory.make_dicom(tmp_path / "relabelled.dcm", photometric="MONOCHROME1")  # same stored pixels
    a, b = predict_files(bundle, [plain, relabelled], progress=False)
    assert b.qc_flags == ["possibly_inverted", "auto_inverted"]
    assert b.probs == pytest.approx(a.probs, abs=1e-6)  # re-inverted: exactly the original picture
    (kept,) = predict_files(bundle, [relabelled], progress=False, fix_inverted=False)
    assert "auto_inverted" not in kept.qc_flags and kept.probs != a.probs


@pytest.mark.skipif(not (SHARED / "dicom").is_dir(), reason="../shared/data/dicom (real DICOM files) absent")
def test_real_dicoms(bundle):
    d = SHARED / "dicom"
    rows = {r.path.rsplit("/", 1)[-1]: r for r in predict_files(bundle, collect_inputs([d]), progress=False)}
    assert all(r.status == "ok" for r in rows.values())
    assert "not_radiograph:OT" in rows["not-a-cxr-ot.dcm"].qc_flags
    # The mislabelled file stores the original's (MONOCHROME2) pixels tagged MONOCHROME1: decoded as
    # tagged it is the negative, which QC points out and predict turns back, so it scores like the original.
    original, mislabelled = rows["siim-cr-chest-pa-jpeg-baseline.dcm"], rows["siim-cr-chest-pa-monochrome1.dcm"]
    assert mislabelled.qc_flags == ["possibly_inverted", "auto_inverted"] and original.qc_flags == []
    assert mislabelled.probs == pytest.approx(original.probs, abs=1e-6) and mislabelled.findings == original.findings
    assert rows["nih-dx-implicit-vr.dcm"].qc_flags == []


def test_a_true_monochrome1_file_scores_exactly_like_its_monochrome2_twin(bundle, tmp_path):
    """Built from the real NIH pixels, so it runs in every clone: 255 - v stored and tagged MONOCHROME1 reads
    back as the original picture, with no QC flag, and scores bit for bit like the MONOCHROME2 file."""
    original_path = factory.make_dicom(tmp_path / "m2.dcm")
    m1_path = factory.make_dicom(tmp_path / "m1.dcm", 255 - factory.real_pixels(), photometric="MONOCHROME1")
    (original,) = predict_files(bundle, [original_path], progress=False)   # one call each: row 0 of a batch of one
    (true_m1,) = predict_files(bundle, [m1_path], progress=False)
    assert true_m1.status == "ok" and true_m1.qc_flags == [] == original.qc_flags
    assert true_m1.probs == original.probs and true_m1.findings == original.findings


@pytest.mark.skipif(not (SHARED / "dicom").is_dir(), reason="../shared/data/dicom (real DICOM files) absent")
def test_true_monochrome1_scores_exactly_like_its_original(bundle):
    """255 - v stored and tagged MONOCHROME1: the reader's inversion gives back the original, no flag."""
    d = SHARED / "dicom"
    # One call each, so both images sit in row 0 of a batch of one: with several threads a GEMM may round two
    # rows of one batch differently, which would test the BLAS, not the reader.
    (original,) = predict_files(bundle, [d / "siim-cr-chest-pa-jpeg-baseline.dcm"], progress=False)
    (true_m1,) = predict_files(bundle, [d / "siim-cr-chest-pa-true-monochrome1.dcm"], progress=False)
    assert true_m1.status == "ok" and true_m1.qc_flags == [] == original.qc_flags
    assert true_m1.probs == original.probs and true_m1.findings == original.findings  # identical, not close


def test_display_copy_for_overlays_matches_the_model_input(folder):
    img = load_for_model(folder / "a.png", 32, display_size=128)
    assert img.square.shape == (32, 32) and img.display.shape == (128, 128)
    small = np.asarray(Image.fromarray(img.display).resize((32, 32), Image.BILINEAR), dtype=np.int32)
    assert np.abs(small - img.square).mean() < 8  # the same picture, only sharper
    assert load_for_model(folder / "a.png", 32).display is None


def test_exif_rotated_jpeg_is_scored_upright_and_flagged(bundle, tmp_path):
    upright = Image.fromarray(factory.real_pixels()[:, 8:56].copy())  # non-square: a turn changes the shape
    upright.save(tmp_path / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6  # "turn 90 degrees clockwise to show": stored sideways
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "exif6.jpg", quality=95, exif=exif)
    a, b = (load_for_model(tmp_path / n, 32) for n in ("upright.jpg", "exif6.jpg"))
    assert a.flags == [] and b.flags == ["exif_rotated:6"]
    assert np.abs(a.square.astype(int) - b.square).mean() < 3 and a.placement == b.placement
    sideways = images.square_resize(np.rot90(np.asarray(upright)), 32).astype(int)
    assert np.abs(sideways - b.square).mean() > 10 * np.abs(a.square.astype(int) - b.square).mean()
    (row,) = predict_files(bundle, [tmp_path / "exif6.jpg"], progress=False)
    assert row.status == "ok" and row.qc_flags == ["exif_rotated:6"]


def test_loaded_image_knows_where_it_lies_in_its_square(tmp_path):
    Image.fromarray(factory.real_pixels()[12:52].copy()).save(tmp_path / "wide.png")  # 64 x 40
    img = load_for_model(tmp_path / "wide.png", 32)
    assert img.placement == images.square_placement((40, 64)) == (12 / 64, 0.0, 52 / 64, 1.0)
