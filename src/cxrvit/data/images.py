"""Decode a chest radiograph file into one grey 2-D array, and fit it to a square.

Decoders are pluggable: each registers a *sniffer* that looks at the first bytes of a file
(never its extension, which lies often enough) and a *decoder* that returns a 2-D grey
``numpy`` array. PNG and JPEG are handled by Pillow here; the DICOM reader registers itself
from :mod:`cxrvit.data.dicom`.

Geometry rule, used everywhere an image is resized: pad the shorter side symmetrically with
the image's minimum value to make a square (no anatomy is cropped away and the aspect ratio
is kept), then resize with Pillow's antialiased bilinear filter.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

#: Refuse images with more pixels than this (decompression-bomb guard): 16k x 16k.
MAX_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageReadError(ValueError):
    """An image file could not be decoded. The message names the file and the reason."""

    def __init__(self, path: os.PathLike | str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class Decoder:
    name: str
    sniff: Callable[[bytes], bool]
    decode: Callable[[Path], np.ndarray]


_DECODERS: list[Decoder] = []


def register_decoder(decoder: Decoder) -> None:
    """Add a decoder; later registrations are tried first."""
    _DECODERS.insert(0, decoder)


def _pil_decode(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()  # forces a full decode: truncated files fail here, not later
        if img.width * img.height > MAX_PIXELS:
            raise ImageReadError(path, f"{img.width}x{img.height} exceeds the {MAX_PIXELS}-pixel limit")
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(img, dtype=np.uint16 if img.mode.startswith("I;16") else np.int32)
        if img.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
            # Some NIH PNGs are RGBA with identical colour channels; luminance handles any of them.
            img = img.convert("L")
        elif img.mode != "L":
            img = img.convert("L")
        return np.asarray(img, dtype=np.uint8)


register_decoder(Decoder("png", lambda head: head.startswith(b"\x89PNG\r\n\x1a\n"), _pil_decode))
register_decoder(Decoder("jpeg", lambda head: head.startswith(b"\xff\xd8\xff"), _pil_decode))


def _ensure_dicom_decoder() -> None:
    # Imported lazily so that the data layer works without pydicom being imported up front.
    if not any(d.name == "dicom" for d in _DECODERS):
        try:
            import cxrvit.data.dicom  # noqa: F401  (registers itself)
        except ImportError:
            pass


def sniff_format(path: os.PathLike | str) -> str | None:
    """Return the name of the decoder that accepts this file, or ``None``."""
    _ensure_dicom_decoder()
    with open(path, "rb") as fh:
        head = fh.read(256)
    for decoder in _DECODERS:
        if decoder.sniff(head):
            return decoder.name
    return None


def read_grey(path: os.PathLike | str) -> np.ndarray:
    """Decode ``path`` to a 2-D grey array (uint8, uint16 or float), or raise ImageReadError."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageReadError(path, f"cannot read: {exc.strerror or exc}") from exc
    if size == 0:
        raise ImageReadError(path, "empty file")
    name = sniff_format(path)
    if name is None:
        raise ImageReadError(path, "not a PNG, JPEG or DICOM file (content not recognised)")
    decoder = next(d for d in _DECODERS if d.name == name)
    try:
        arr = decoder.decode(path)
    except ImageReadError:
        raise
    except Exception as exc:  # decoders raise many types; the caller needs one
        raise ImageReadError(path, f"{name} decode failed: {exc}") from exc
    if arr.ndim != 2 or arr.size == 0:
        raise ImageReadError(path, f"decoded to shape {arr.shape}, expected one 2-D grey image")
    return arr


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map a grey array to uint8. 8-bit input is returned as is; anything else is min-max scaled."""
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip((arr - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def pad_to_square(arr: np.ndarray) -> np.ndarray:
    """Pad the shorter side symmetrically with the image minimum (background is dark on CXRs)."""
    h, w = arr.shape
    if h == w:
        return arr
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    out = np.full((side, side), arr.min(), dtype=arr.dtype)
    out[top : top + h, left : left + w] = arr
    return out


def square_resize(arr: np.ndarray, size: int) -> np.ndarray:
    """The one geometry rule: uint8, pad to square, resize to ``size`` x ``size``."""
    sq = pad_to_square(to_uint8(arr))
    if sq.shape[0] == size:
        return np.ascontiguousarray(sq)
    img = Image.fromarray(sq).resize((size, size), Image.BILINEAR, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def load_square(path: os.PathLike | str, size: int) -> np.ndarray:
    """Read ``path`` and return a ``size`` x ``size`` uint8 grey image."""
    return square_resize(read_grey(path), size)
