"""The FastAPI application behind ``cxrvit serve``: the API and the static reading-room page.

Concurrency: the model is loaded once and all inference runs in ONE worker thread. One, because
Grad-CAM registers hooks on the shared model (two requests explaining at once would see each
other's activations) and because torch already spreads one forward pass over the CPU cores. The
event loop only receives uploads and answers, so ``/healthz`` stays fast while a request is scored.
At most ``max_pending`` predictions are admitted (running + queued); the next gets a 503 with
Retry-After straight away instead of waiting without bound.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from cxrvit import __version__
from cxrvit.serve.analysis import Analyzer, Settings
from cxrvit.serve.uploads import UploadError, parse_multipart, read_capped

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("cxrvit.serve")


def model_info(bundle, source: str) -> dict:
    meta = bundle.meta
    training = dict(meta.get("training") or {})
    src = dict(bundle.threshold_source or {})
    # The lists are long and the patient IDs identify people: their sizes say enough here.
    for key in ("images", "patients"):
        if isinstance(src.get(key), list):
            src[key] = len(src[key])
    cfg = bundle.config or {}
    return {
        "bundle": Path(source).name,
        "format": meta.get("format"),
        "arch": bundle.arch,
        "labels": bundle.labels,
        "thresholds": bundle.thresholds,
        "threshold_source": src,
        "tuned_with_tta": bundle.tuned_with_tta,
        "preprocessing": bundle.preprocessing.to_dict(),
        "training": {k: training.get(k) for k in ("strategy", "best_epoch", "steps", "val_metrics", "tta", "C",
                                                  "oof_mean_auroc_scored", "views") if k in training},
        "recipe": cfg.get("recipe") or cfg.get("name"),
        "cxrvit_version": __version__,
    }


def create_app(bundle, *, source: str = "", settings: Settings | None = None, max_pending: int = 16) -> FastAPI:
    settings = settings or Settings()
    analyze = Analyzer(bundle, settings)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrvit-infer")
    info = model_info(bundle, source or "bundle")
    state = {"pending": 0, "served": 0, "refused": 0}

    app = FastAPI(title="cxrvit serve", version=__version__,
                  description="Multi-label chest X-ray classification (DINO ViT-S/16): findings, QC, heat-maps "
                              "and a templated preliminary report. Not a diagnosis.")
    # No CORS middleware on purpose: browsers then refuse cross-origin calls, so only the page this
    # server itself serves can use the API.

    @app.exception_handler(UploadError)
    async def upload_error(_request: Request, exc: UploadError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": info["bundle"], "pending": state["pending"], "max_pending": max_pending,
                "served": state["served"], "refused_busy": state["refused"]}

    @app.get("/api/model")
    async def get_model():
        return info

    @app.post("/api/predict", summary="Score one radiograph (multipart field 'file', or a raw body)",
              openapi_extra={"requestBody": {"content": {
                  "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                     "properties": {"file": {"type": "string", "format": "binary"}}}},
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def predict(request: Request, heatmaps: bool = True):
        if state["pending"] >= max_pending:
            state["refused"] += 1
            return JSONResponse({"error": f"server busy: {max_pending} images are already being scored; "
                                          "try again in a few seconds"}, status_code=503,
                                headers={"Retry-After": "2"})
        state["pending"] += 1
        t0 = time.perf_counter()
        try:
            declared = request.headers.get("content-length")
            body = await read_capped(request.stream(), int(declared) if declared and declared.isdigit() else None,
                                     settings.max_upload_bytes)
            ctype = request.headers.get("content-type", "")
            data = parse_multipart(body, ctype) if ctype.startswith("multipart/") else body
            del body
            result = await asyncio.get_running_loop().run_in_executor(executor, analyze, data, heatmaps)
        except UploadError as exc:
            # Logged without file name or header content: only the outcome.
            log.info("predict refused: %d (%d ms)", exc.status, (time.perf_counter() - t0) * 1e3)
            raise
        finally:
            state["pending"] -= 1
        state["served"] += 1
        result["model"] = {"bundle": info["bundle"], "arch": info["arch"]}
        log.info("predict ok: %s, %d bytes, %d ms", result["input"]["format"], result["input"]["bytes"],
                 (time.perf_counter() - t0) * 1e3)
        return result

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/settings", include_in_schema=False)
    async def page_settings():
        return {"max_upload_bytes": settings.max_upload_bytes, "show_identifiers": settings.show_identifiers}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.executor = executor
    return app
