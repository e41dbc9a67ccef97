"""Decode a chest radiograph file into one grey 2-D array, and fit it to a square.

Decoders are pluggable: each registers a *sniffer* that looks at the first bytes of a file
(never its extension, which lies often enough) and a *decoder* that returns a 2-D grey
``numpy`` array. PNG and JPEG are handled by Pillow here; the DICOM reader registers itself
from :mod:`cxrvit.data.dicom`.

Geometry rule, used everywhere an image is resized: pad the shorter side symmetrically with
the image's minimum value to make a square (no anatomy is cropped away and the aspect ratio
is kept), then resize with Pillow's antialiased bilinear filter. :func:`square_placement` says
where the image lies inside that square.

A PNG/JPEG whose EXIF Orientation tag says its pixels are stored rotated or mirrored is turned
upright first (``PIL.ImageOps.exif_transpose``), so it is read as every viewer shows it;
:func:`read_grey_info` reports the tag so that QC can say so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

#: Refuse images with more pixels than this (decompression-bomb guard): 16k x 16k.
MAX_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


#: The EXIF tag that says how the stored pixels must be turned to be shown upright (1: as stored).
EXIF_ORIENTATION = 0x0112


class ImageReadError(ValueError):
    """An image file could not be decoded. The message names the file and the reason."""

    def __init__(self, path: os.PathLike | str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class PixelLimitError(ImageReadError):
    """An image has more pixels than the decompression-bomb limit ``limit`` allows."""

    def __init__(self, path: os.PathLike | str, reason: str, limit: int):
        self.limit = limit
        super().__init__(path, reason)


@dataclass(frozen=True)
class Decoder:
    name: str
    sniff: Callable[[bytes], bool]
    decode: Callable[[Path], np.ndarray]
    #: Optional: ``decode`` that also says what it did (``{"exif_orientation": 6}``), for :func:`read_grey_info`.
    decode_info: Callable[[Path], tuple[np.ndarray, dict]] | None = None


_DECODERS: list[Decoder] = []


def register_decoder(decoder: Decoder) -> None:
    """Add a decoder; later registrations are tried first."""
    _DECODERS.insert(0, decoder)


def _exif_orientation(img: Image.Image) -> int:
    """The image's EXIF Orientation (1..8); 1 when absent, out of range or unreadable (never fatal)."""
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block must not cost the picture
        return 1
    return value if 1 <= value <= 8 else 1


def _pil_decode_info(path: Path) -> tuple[np.ndarray, dict]:
    with Image.open(path) as img:  # lazy: the size is known from the header, before any pixel is decoded
        # Checked before the decode: Pillow itself refuses only above twice its MAX_IMAGE_PIXELS, and a file just
        # under that would be decoded in full (GBs) first, as `cxrvit prepare` did, to be refused afterwards.
        if img.width * img.height > MAX_PIXELS:
            raise PixelLimitError(path, f"{img.width}x{img.height} exceeds the {MAX_PIXELS}-pixel limit", MAX_PIXELS)
        img.load()  # forces a full decode: truncated files fail here, not later
        orientation = _exif_orientation(img)
        if orientation != 1:  # stored rotated/mirrored: read it as viewers show it
            img = ImageOps.exif_transpose(img)
        info = {"exif_orientation": orientation}
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(img, dtype=np.uint16 if img.mode.startswith("I;16") else np.int32), info
        if img.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
            # Some NIH PNGs are RGBA with identical colour channels; luminance handles any of them.
            img = img.convert("L")
        elif img.mode != "L":
            img = img.convert("L")
        return np.asarray(img, dtype=np.uint8), info


def _pil_decode(path: Path) -> np.ndarray:
    return _pil_decode_info(path)[0]


register_decoder(Decoder("png", lambda head: head.startswith(b"\x89PNG\r\n\x1a\n"), _pil_decode, _pil_decode_info))
register_decoder(Decoder("jpeg", lambda head: head.startswith(b"\xff\xd8\xff"), _pil_decode, _pil_decode_info))


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
    return read_grey_info(path)[0]


def read_grey_info(path: os.PathLike | str) -> tuple[np.ndarray, dict]:
    """:func:`read_grey`, plus what the decoder did to get the picture upright: ``{"exif_orientation": N}``
    for PNG/JPEG (N != 1: the stored pixels were turned as the EXIF tag says), ``{}`` for the others."""
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
        arr, info = decoder.decode_info(path) if decoder.decode_info else (decoder.decode(path), {})
    except ImageReadError:
        raise
    except Exception as exc:  # decoders raise many types; the caller needs one
        raise ImageReadError(path, f"{name} decode failed: {exc}") from exc
    if arr.ndim != 2 or arr.size == 0:
        raise ImageReadError(path, f"decoded to shape {arr.shape}, expected one 2-D grey image")
    return arr, info


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map a grey array to uint8. 8-bit input is returned as is; anything else is min-max scaled."""
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip((arr - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def _padding(shape: tuple[int, int]) -> tuple[int, int, int]:
    """(side, top, left) of the square :func:`pad_to_square` makes of an ``(h, w)`` image."""
    h, w = shape
    side = max(h, w)
    return side, (side - h) // 2, (side - w) // 2


def square_placement(shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """Where an ``(h, w)`` image lies in its padded square (and so in any ``square_resize`` of it): top, left,
    bottom, right as fractions of the square's side. The rest of the square is padding."""
    h, w = shape[:2]
    side, top, left = _padding((h, w))
    return top / side, left / side, (top + h) / side, (left + w) / side


def pad_to_square(arr: np.ndarray) -> np.ndarray:
    """Pad the shorter side symmetrically with the image minimum (background is dark on CXRs)."""
    h, w = arr.shape
    if h == w:
        return arr
    side, top, left = _padding((h, w))
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
