"""One upload in, one JSON-ready result out: decode, QC, score, explain, report.

Runs in the server's single inference thread (see ``app.py`` for why one). Every step reuses the
code ``cxrvit predict`` runs, so the web page and the CLI give the same numbers for the same file.
"""
from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cxrvit.data import images
from cxrvit.data.images import ImageReadError, PixelLimitError
from cxrvit.inference import prelim_report
from cxrvit.inference.findings import explain_findings, labels_to_explain
from cxrvit.inference.predict import load_for_model, score_batch
from cxrvit.inference.qc import dicom_summary
from cxrvit.serve.uploads import UploadError, memory_path

#: Side of the picture sent to the page (the maps are at the model's input size and stretched over it).
DISPLAY_SIZE = 448
#: DICOM header fields that identify the patient; hidden unless the server runs with --show-identifiers.
IDENTIFIERS = ("patient_name", "patient_id")
#: Default decompression-bomb limit of the server (``--max-pixels``): 50 megapixels. The largest chest
#: detectors are about 43 x 43 cm at 0.1 mm, 4300 x 4300 = 18.5 MP; 50 MP leaves room and keeps a decoded
#: 16-bit image under 100 MB, where the library-wide limit (16384^2 = 268 MP) let one upload take gigabytes.
SERVE_MAX_PIXELS = 50_000_000


def png_data_url(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def heat_rgba(heat: np.ndarray) -> np.ndarray:
    """A [0, 1] map as a 'jet' RGBA image whose alpha grows with the value, so cold areas stay clear
    and the page's opacity slider scales the whole layer."""
    from matplotlib import colormaps

    rgba = (colormaps["jet"](heat) * 255).astype(np.uint8)
    rgba[..., 3] = (np.sqrt(np.clip(heat, 0, 1)) * 255).astype(np.uint8)
    return rgba


@dataclass
class Settings:
    max_upload_bytes: int = 64 * 2**20
    max_pixels: int = SERVE_MAX_PIXELS
    show_identifiers: bool = False
    heatmaps: bool = True


def _header_summary(path, show_identifiers: bool) -> dict | None:
    info = dicom_summary(path, decode=False)  # pixels are decoded once, by load_for_model
    for key in ("path", "qc", "decode_error"):
        info.pop(key, None)
    if not show_identifiers:
        for key in IDENTIFIERS:
            if info.get(key) is not None:
                info[key] = "hidden"
    return info


class Analyzer:
    """Holds the bundle; ``__call__(data)`` is one request's work."""

    def __init__(self, bundle, settings: Settings):
        self.bundle = bundle
        self.settings = settings

    def __call__(self, data: bytes, want_heatmaps: bool = True) -> dict:
        t0 = time.perf_counter()
        if not data:
            raise UploadError(400, "empty upload")
        with memory_path(data) as path:
            fmt = images.sniff_format(path)  # content, never the file name
            if fmt is None:
                raise UploadError(415, "not a PNG, JPEG or DICOM file (content not recognised; "
                                       "the file name is not trusted)")
            try:  # the pixel count is checked from the header (Pillow's lazy open, DICOM Rows x Columns) first
                img = load_for_model(path, self.bundle.preprocessing.square_size, self.settings.max_pixels,
                                     display_size=DISPLAY_SIZE)
                header = _header_summary(path, self.settings.show_identifiers) if fmt == "dicom" else None
            except PixelLimitError as exc:
                raise UploadError(413, f"image too large: {exc.reason}; this server accepts at most {exc.limit} "
                                       "pixels (server option --max-pixels)") from exc
            except ImageReadError as exc:
                # exc.reason, not str(exc): the latter names the /proc path, which means nothing to a user
                raise UploadError(422, f"cannot read this {fmt.upper()} file: {exc.reason}") from exc
        t_read = time.perf_counter()
        bundle = self.bundle
        probs_arr = score_batch(bundle, [img.square])
        probs = {label: float(v) for label, v in zip(bundle.labels, probs_arr[0])}
        t_score = time.perf_counter()
        overlays, peaks = {}, {}
        if want_heatmaps and self.settings.heatmaps:
            chosen = labels_to_explain(probs, bundle.thresholds)
            e = explain_findings(bundle, [img.square], probs_arr, [chosen], [img.placement])[0]
            peaks = e.peaks
            overlays = {"attention": png_data_url(heat_rgba(e.attention)),
                        "rollout": png_data_url(heat_rgba(e.rollout)),
                        "gradcam": {k: png_data_url(heat_rgba(v)) for k, v in e.gradcam.items()}}
        t_explain = time.perf_counter()
        calls = prelim_report.assess(probs, bundle.thresholds, peaks)
        return {
            "input": {"format": fmt, "bytes": len(data)},
            "qc": {"flags": img.flags,
                   "warnings": [prelim_report.qc_message(f) for f in img.flags],
                   "severe": any(f.partition(":")[0] in prelim_report.SEVERE_FLAGS for f in img.flags)},
            "dicom": header,
            "findings": [c.to_dict() for c in calls],
            "called": [c.label for c in calls if c.call],
            "image": png_data_url(img.display),
            "overlays": overlays,
            "report": {"short": prelim_report.render(calls, img.flags, full=False),
                       "full": prelim_report.render(calls, img.flags, full=True),
                       "sections": prelim_report.report_sections(calls, img.flags, full=True),
                       "disclaimer": prelim_report.DISCLAIMER},
            "timing_ms": {"read": round((t_read - t0) * 1e3, 1), "score": round((t_score - t_read) * 1e3, 1),
                          "explain": round((t_explain - t_score) * 1e3, 1),
                          "total": round((time.perf_counter() - t0) * 1e3, 1)},
        }
