"""The HTTP API of ``cxrvit serve`` on real DICOMs and on bad input (FastAPI's TestClient)."""
from __future__ import annotations

import base64
import dataclasses
import io
import logging
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cxrvit.inference.findings import MAX_LABELS
from cxrvit.inference.predict import predict_files
from cxrvit.serve import app as app_module
from cxrvit.serve.analysis import Settings
from cxrvit.serve.app import create_app
from serve_support import factory


def client(bundle, **kw) -> TestClient:
    settings = kw.pop("settings", None) or Settings()
    return TestClient(create_app(bundle, source="/runs/x/run", settings=settings, **kw))


def post_file(c: TestClient, path, name=None):
    return c.post("/api/predict", files={"file": (name or path.name, path.read_bytes(), "application/octet-stream")})


def png_size(data_url: str) -> tuple[int, int]:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).size


def test_health_model_page_and_openapi(serve_bundle):
    c = client(serve_bundle)
    assert c.get("/healthz").json()["status"] == "ok"
    m = c.get("/api/model").json()
    assert m["labels"] == serve_bundle.labels and m["thresholds"] == serve_bundle.thresholds
    assert m["threshold_source"] == {"split": "val", "images": 2} and m["preprocessing"]["size"] == 32
    assert m["bundle"] == "run"  # the folder name, not the server's full path
    page = c.get("/")
    assert page.status_code == 200 and 'id="findings"' in page.text and "/static/viewer.js" in page.text
    assert c.get("/static/viewer.js").status_code == 200
    assert "/api/predict" in c.get("/openapi.json").json()["paths"]


def test_model_info_counts_tuning_patients_instead_of_listing_them(serve_bundle):
    """Bundles now record their tuning patients' IDs (the evaluation guard reads them): the API says how many."""
    bundle = dataclasses.replace(serve_bundle, threshold_source={"split": "val", "images": ["a.png", "b.png"],
                                                                 "patients": ["00000001", "00000002"]})
    m = client(bundle).get("/api/model").json()
    assert m["threshold_source"] == {"split": "val", "images": 2, "patients": 2}


def test_predict_real_cxr_dicom_matches_cli_scoring(serve_bundle, dicoms):
    c = client(serve_bundle)
    r = post_file(c, dicoms["cxr"])
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["input"]["format"] == "dicom" and j["qc"]["flags"] == [] and not j["qc"]["severe"]
    probs = [f["probability"] for f in j["findings"]]
    assert probs == sorted(probs, reverse=True) and len(probs) == len(serve_bundle.labels)
    for f in j["findings"]:
        assert f["threshold"] == serve_bundle.thresholds[f["label"]]
        assert f["call"] == (f["probability"] >= f["threshold"])
    assert set(j["called"]) == {f["label"] for f in j["findings"] if f["call"]}
    # the same numbers as `cxrvit predict` on the same file
    (row,) = predict_files(serve_bundle, [dicoms["cxr"]], progress=False)
    for f in j["findings"]:
        assert f["probability"] == pytest.approx(row.probs[f["label"]], abs=1e-6)
    # header as dicom-info gives it, identifiers hidden by default
    assert j["dicom"]["modality"] == "CR" and j["dicom"]["patient_name"] == "hidden"
    assert j["dicom"]["patient_id"] == "hidden" and j["dicom"]["size"]
    # overlays: label-free maps plus Grad-CAM for every call, as PNGs at the model's size
    assert png_size(j["overlays"]["attention"]) == (32, 32) and png_size(j["overlays"]["rollout"]) == (32, 32)
    # (the most probable calls, up to MAX_LABELS maps: each costs a backward pass)
    assert set(j["called"][:MAX_LABELS]) <= set(j["overlays"]["gradcam"])
    assert len(j["overlays"]["gradcam"]) == MAX_LABELS
    assert png_size(j["image"]) == (448, 448)
    for label in j["overlays"]["gradcam"]:
        peak = next(f["peak"] for f in j["findings"] if f["label"] == label)
        assert peak["side"] in ("left", "right", "central") and peak["zone"] in ("upper", "middle", "lower")
    rep = j["report"]
    assert "FINDINGS:" in rep["short"] and "IMPRESSION:" in rep["full"] and "NOT A DIAGNOSIS" in rep["short"]
    assert len(rep["full"]) > len(rep["short"])


def test_non_cxr_dicom_is_scored_but_flagged(serve_bundle, dicoms):
    j = post_file(client(serve_bundle), dicoms["not_cxr"]).json()
    assert "not_radiograph:OT" in j["qc"]["flags"] and j["qc"]["severe"]
    assert any("not a projection radiograph" in w for w in j["qc"]["warnings"])
    assert "not a frontal chest radiograph" in j["report"]["short"]


def test_identifiers_shown_only_with_the_flag(serve_bundle, tmp_path):
    path = factory.make_dicom(tmp_path / "id.dcm")
    c = client(serve_bundle, settings=Settings(show_identifiers=True))
    d = post_file(c, path).json()["dicom"]
    assert d["patient_name"] == "Test^Fixture" and d["patient_id"] == "fixture-1"


def test_content_is_sniffed_not_the_name(serve_bundle):
    buf = io.BytesIO()
    Image.fromarray(factory.real_pixels()).save(buf, format="PNG")
    c = client(serve_bundle)
    r = c.post("/api/predict", files={"file": ("scan.dcm", buf.getvalue())})
    assert r.status_code == 200 and r.json()["input"]["format"] == "png" and r.json()["dicom"] is None
    # a raw body (no multipart) works too
    r = c.post("/api/predict", content=buf.getvalue(), headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["input"]["format"] == "png"
    # heat-maps can be skipped per request
    assert c.post("/api/predict?heatmaps=false", content=buf.getvalue()).json()["overlays"] == {}


def test_bad_inputs_get_readable_4xx(serve_bundle, dicoms):
    c = client(serve_bundle)
    r = post_file(c, dicoms["corrupt"])
    assert r.status_code == 422 and r.json()["error"].startswith("cannot read this DICOM file")
    assert "/proc/" not in r.json()["error"]
    r = c.post("/api/predict", files={"file": ("x.png", b"this is not an image at all" * 10)})
    assert r.status_code == 415 and "not a PNG, JPEG or DICOM" in r.json()["error"]
    r = c.post("/api/predict", files={"file": ("x.png", b"")})
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = c.post("/api/predict", files={"other": ("a", b"1"), "other2": ("b", b"2")})
    assert r.status_code == 400 and "no file" in r.json()["error"]


def test_upload_size_cap(serve_bundle, dicoms):
    c = client(serve_bundle, settings=Settings(max_upload_bytes=10_000))
    r = post_file(c, dicoms["cxr"])  # > 10 kB
    assert r.status_code == 413 and "too large" in r.json()["error"] and "--max-upload-mb" in r.json()["error"]

    def chunked():  # no Content-Length: the cap must hold while streaming
        for _ in range(20):
            yield b"\0" * 1000

    r = c.post("/api/predict", content=chunked(), headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413


def test_pixel_count_cap(serve_bundle, tmp_path):
    path = factory.make_dicom(tmp_path / "big.dcm")  # 64 x 64 = 4096 pixels
    r = post_file(client(serve_bundle, settings=Settings(max_pixels=1000)), path)
    assert r.status_code == 413 and "exceeds the limit of 1000" in r.json()["error"]
    assert "at most 1000 pixels" in r.json()["error"] and "--max-pixels" in r.json()["error"]


def test_503_when_full_and_health_stays_responsive(serve_bundle, dicoms, monkeypatch):
    release, entered = threading.Event(), threading.Event()
    real_call = app_module.Analyzer.__call__

    def slow(self, data, want_heatmaps=True):
        entered.set()
        release.wait(30)
        return real_call(self, data, want_heatmaps)

    monkeypatch.setattr(app_module.Analyzer, "__call__", slow)
    c = client(serve_bundle, max_pending=1)
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(r=post_file(c, dicoms["cxr"])))
    t.start()
    try:
        assert entered.wait(30)
        t0 = time.perf_counter()
        assert c.get("/healthz").json()["pending"] == 1  # answered while the worker is busy
        assert time.perf_counter() - t0 < 5
        busy = post_file(c, dicoms["cxr"])
        assert busy.status_code == 503 and "busy" in busy.json()["error"] and busy.headers["retry-after"]
    finally:
        release.set()
        t.join(60)
    assert first["r"].status_code == 200
    assert c.get("/healthz").json()["pending"] == 0


def test_no_identifiers_in_logs_and_no_cors(serve_bundle, tmp_path, caplog):
    path = factory.make_dicom(tmp_path / "Doe_John_12345.dcm")
    c = client(serve_bundle)
    with caplog.at_level(logging.DEBUG):
        r = c.post("/api/predict", files={"file": ("Doe_John_12345.dcm", path.read_bytes())},
                   headers={"Origin": "http://evil.example"})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    assert "predict ok" in caplog.text
    for secret in ("Doe_John", "12345", "Test^Fixture", "fixture-1"):
        assert secret not in caplog.text
    pre = c.options("/api/predict", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in {k.lower() for k in pre.headers}


def test_serve_without_model_says_how_to_get_one(capsys):
    from cxrvit.cli import main

    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "scripts/run_sample.sh" in err and "runs/sample/run" in err


def test_serve_bad_model_folder(tmp_path, capsys):
    from cxrvit.cli import main

    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "not a cxrvit model bundle" in capsys.readouterr().err
