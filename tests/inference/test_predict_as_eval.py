"""``predict`` feeds the model what validation and ``eval`` fed it: a file scores as its row of a prepared cache.

Validation (which tuned the thresholds) and ``eval`` score a cache's uint8 squares (``square_resize`` at the
cache's size), resized to the model size in float by the scoring pass. A bundle that records that size
(``preprocessing.source_size``) makes ``predict`` square the file to it with the same geometry and hand the
same uint8 square to the same pass; squaring straight to the model size (Pillow, then uint8) is another input.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cxrvit.data import images
from cxrvit.data.cache import prepare_cache
from cxrvit.data.preprocess import Preprocessing
from cxrvit.inference.bundle import load_bundle, save_bundle
from cxrvit.inference.findings import explain_findings
from cxrvit.inference.predict import load_for_model, predict_files
from cxrvit.labels import DEFAULT_LABELS
from cxrvit.model.vit import vit_tiny

from inference_support import ROOT, THRESHOLDS

MODEL, CACHED = 32, 48  # a model at 32 px whose training/validation images were cached at 48 px


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real NIH fixture radiographs (64 px, grey and RGBA) plus a landscape and a portrait crop of one."""
    d = tmp_path_factory.mktemp("files")
    src = ROOT / "tests" / "fixtures" / "nih" / "images"
    for name in ("00000001_000.png", "00000100_000.png", "00000211_000.png", "00001369_000.png"):
        shutil.copy(src / name, d / name)
    real = np.asarray(Image.open(src / "00000001_000.png").convert("L"))
    Image.fromarray(real[12:52].copy()).save(d / "landscape.png")
    Image.fromarray(real[:, 8:48].copy()).save(d / "portrait.png")
    return sorted(d.iterdir())


@pytest.fixture(scope="module")
def cache(files, tmp_path_factory):
    return prepare_cache(files[0].parent, tmp_path_factory.mktemp("c") / "cache", CACHED, unlabelled=True,
                         workers=1, progress=False, log=lambda *_: None)


def _bundle(tmp_path_factory, source_size):
    torch.manual_seed(0)
    model = vit_tiny(num_classes=len(DEFAULT_LABELS))
    folder = save_bundle(tmp_path_factory.mktemp("b"), model, list(DEFAULT_LABELS), THRESHOLDS,
                         Preprocessing(size=MODEL, source_size=source_size), arch="vit_tiny")
    return load_bundle(folder)


@pytest.fixture(scope="module")
def bundle_cached(tmp_path_factory):
    return _bundle(tmp_path_factory, CACHED)


@pytest.fixture(scope="module")
def bundle_old(tmp_path_factory):
    """The same weights in a bundle written before ``source_size`` was recorded."""
    return _bundle(tmp_path_factory, None)


def _cache_rows(cache, files) -> np.ndarray:
    names = list(cache.names)
    return np.stack([cache.pixels[names.index(f.name)] for f in files])


def test_a_file_scores_as_its_cache_row(bundle_cached, cache, files):
    rows = predict_files(bundle_cached, files, batch_size=len(files), progress=False)
    assert all(r.status == "ok" and "auto_inverted" not in r.qc_flags for r in rows)
    got = np.array([[r.probs[k] for k in bundle_cached.labels] for r in rows])
    expected = bundle_cached.predict_proba(torch.from_numpy(_cache_rows(cache, files))[:, None]).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # the model-size square the old predict fed is another input: this test can tell the two apart
    pil = np.stack([images.square_resize(images.read_grey(f), MODEL) for f in files])
    assert np.abs(bundle_cached.predict_proba(torch.from_numpy(pil)[:, None]).numpy() - expected).max() > 1e-6


def test_the_square_is_the_cache_row_exactly(bundle_cached, cache, files):
    for f, row in zip(files, _cache_rows(cache, files)):
        img = load_for_model(f, bundle_cached.preprocessing.square_size)
        assert img.square.dtype == np.uint8 and np.array_equal(img.square, row)


def test_older_bundles_square_to_the_model_size_and_take_the_same_pass(bundle_old, files):
    assert bundle_old.preprocessing.source_size is None and bundle_old.preprocessing.square_size == MODEL
    rows = predict_files(bundle_old, files, batch_size=len(files), progress=False)
    squares = np.stack([images.square_resize(images.read_grey(f), MODEL) for f in files])
    expected = bundle_old.predict_proba(torch.from_numpy(squares)[:, None]).numpy()
    np.testing.assert_allclose([[r.probs[k] for k in bundle_old.labels] for r in rows], expected, rtol=0, atol=1e-6)


def test_source_size_round_trips_and_stays_optional(bundle_cached, bundle_old):
    assert bundle_cached.preprocessing.source_size == CACHED and bundle_cached.preprocessing.square_size == CACHED
    assert bundle_cached.meta["preprocessing"]["source_size"] == CACHED
    assert "source_size" not in bundle_old.meta["preprocessing"]  # older readers still load such a bundle.json
    assert Preprocessing.from_dict(json.loads(json.dumps(Preprocessing(size=8).to_dict()))).source_size is None
    for bad in (0, -3, 1.5, "160", True):
        with pytest.raises(ValueError, match="source_size"):
            Preprocessing(size=32, source_size=bad)


def test_heatmaps_explain_the_scored_input(bundle_cached, files):
    """Maps of a cache-size square are at the model size: the pass's view, not the raw square."""
    img = load_for_model(files[0], bundle_cached.preprocessing.square_size)
    probs = predict_files(bundle_cached, files[:1], progress=False)[0].probs
    p = np.array([[probs[k] for k in bundle_cached.labels]])
    (e,) = explain_findings(bundle_cached, [img.square], p, [bundle_cached.labels[:2]], [img.placement])
    assert e.attention.shape == (MODEL, MODEL) and all(m.shape == (MODEL, MODEL) for m in e.gradcam.values())
