"""``cxrvit serve``: the decompression-bomb limit (default, ``--max-pixels``, refused from the header before
decoding) and scoring as ``predict`` does for a bundle that records its cache size."""
from __future__ import annotations

import argparse
import io
import struct
import zlib

import numpy as np
import pydicom
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from cxrvit.data import images
from cxrvit.data.preprocess import Preprocessing
from cxrvit.inference import predict as predict_mod
from cxrvit.inference.bundle import load_bundle, save_bundle
from cxrvit.inference.predict import predict_files
from cxrvit.labels import DEFAULT_LABELS
from cxrvit.model.vit import vit_tiny
from cxrvit.serve import app as app_module
from cxrvit.serve import commands as serve_commands
from cxrvit.serve.analysis import SERVE_MAX_PIXELS, Settings
from cxrvit.serve.app import create_app
from serve_support import THRESHOLDS, factory


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` grey pixels and carries almost none: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


@pytest.fixture()
def no_decoding(monkeypatch):
    """Fails the test if any pixel is decoded."""
    def refuse(path):
        raise AssertionError(f"{path}: pixels decoded before the size was checked")

    monkeypatch.setattr(predict_mod.images, "read_grey_info", refuse)


def _post(c: TestClient, data: bytes):
    return c.post("/api/predict?heatmaps=false", content=data, headers={"content-type": "application/octet-stream"})


def test_default_limit_is_50_megapixels():
    assert Settings().max_pixels == SERVE_MAX_PIXELS == 50_000_000 < images.MAX_PIXELS
    assert SERVE_MAX_PIXELS > 4300 * 4300  # the largest chest detectors (43 cm at 0.1 mm)


def test_png_bomb_is_refused_from_its_header(serve_bundle, no_decoding):
    c = TestClient(create_app(serve_bundle, source="x"))
    r = _post(c, png_header_only(8000, 8000))  # 64 MP: under the library-wide limit, over the server's
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert "8000x8000 = 64000000 pixels" in err and "at most 50000000 pixels" in err and "--max-pixels" in err
    assert "/proc/" not in err


def test_dicom_bomb_is_refused_from_rows_and_columns(serve_bundle, tmp_path, no_decoding):
    path = factory.make_dicom(tmp_path / "big.dcm")
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 9000, 7000
    buf = io.BytesIO()
    ds.save_as(buf)
    r = _post(TestClient(create_app(serve_bundle, source="x")), buf.getvalue())
    assert r.status_code == 413 and "7000x9000" in r.json()["error"]


def test_max_pixels_option_reaches_the_server(serve_bundle_dir, monkeypatch):
    seen = {}
    real = app_module.create_app

    def create_app(bundle, **kw):
        seen["settings"] = kw["settings"]
        return real(bundle, **kw)

    monkeypatch.setattr(app_module, "create_app", create_app)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("app", app))
    parser = argparse.ArgumentParser(prog="cxrvit")
    serve_commands.register(parser.add_subparsers(dest="command"))
    for argv, expected in [([], SERVE_MAX_PIXELS), (["--max-pixels", "1234"], 1234)]:
        seen.clear()
        args = parser.parse_args(["serve", "--model", str(serve_bundle_dir), *argv])
        assert args.func(args) == 0 and seen["settings"].max_pixels == expected and "app" in seen
    args = parser.parse_args(["serve", "--model", str(serve_bundle_dir), "--max-pixels", "0"])
    assert args.func(args) == 2


@pytest.mark.parametrize("option", [["--max-pending", "0"], ["--max-upload-mb", "0"], ["--max-upload-mb", "-1"]])
def test_limits_that_refuse_every_upload_are_refused_at_start(serve_bundle_dir, monkeypatch, capsys, option):
    # A server started with them answered every prediction 503 "server busy: 0 images are already being scored",
    # or 413 "upload too large: the limit is 0 MB".
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: pytest.fail("the server was started"))
    parser = argparse.ArgumentParser(prog="cxrvit")
    serve_commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", str(serve_bundle_dir), *option])
    assert args.func(args) == 2
    assert f"{option[0]} {option[1]}" in capsys.readouterr().err


def test_serve_scores_a_file_as_predict_and_as_its_cache_row(tmp_path):
    torch.manual_seed(0)
    model = vit_tiny(num_classes=len(DEFAULT_LABELS))
    bundle = load_bundle(save_bundle(tmp_path / "b", model, list(DEFAULT_LABELS), THRESHOLDS,
                                     Preprocessing(size=32, source_size=48), arch="vit_tiny"))
    real = factory.real_pixels()[10:54].copy()  # landscape, padded
    Image.fromarray(real).save(tmp_path / "x.png")
    j = _post(TestClient(create_app(bundle, source="x")), (tmp_path / "x.png").read_bytes()).json()
    got = {f["label"]: f["probability"] for f in j["findings"]}
    (row,) = predict_files(bundle, [tmp_path / "x.png"], progress=False)
    cached = torch.from_numpy(images.square_resize(real, 48).copy())[None, None]  # `cxrvit prepare --size 48`
    expected = bundle.predict_proba(cached)[0].numpy()
    np.testing.assert_allclose([got[k] for k in bundle.labels], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose([row.probs[k] for k in bundle.labels], expected, rtol=0, atol=1e-6)
