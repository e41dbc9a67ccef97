"""DICOM reader: turn a radiograph's stored pixels into the grey picture a radiologist sees.

The pipeline follows the DICOM grey-scale display chain, in its order:

1. decode the stored values (native, implicit/explicit VR, or compressed: JPEG Baseline, JPEG
   Lossless, JPEG-LS, JPEG 2000, RLE -- through pydicom's pylibjpeg plugins), keeping only the
   ``BitsStored`` low bits, because stray high bits in a 12-in-16 image are overlay or noise;
2. the Modality LUT (``RescaleSlope``/``RescaleIntercept`` or a Modality LUT Sequence);
3. the VOI LUT (a VOI LUT Sequence, else the first ``WindowCenter``/``WindowWidth``), when the
   file carries one -- that is the contrast the acquiring site chose for reading;
4. ``MONOCHROME1`` (bright = low attenuation) is inverted, so every image cxrvit sees is
   ``MONOCHROME2`` (bright = bone).

The result is a 2-D array (uint8/uint16 when no LUT changed the values, float32 otherwise);
:func:`cxrvit.data.images.to_uint8` maps it to 8 bits.

Two kinds of object are not one grey radiograph, and QC says so (``cxrvit.inference.qc``):
- RGB/YBR colour (``SamplesPerPixel`` 3): films digitised on a colour scanner and saved as secondary
  captures are grey pictures in three equal channels, so they are turned into grey with ITU-R 601 luma
  -- what the PNG loader already does for NIH's RGBA PNGs -- and flagged ``colour_converted``. PALETTE
  COLOR is refused: a pseudo-colour map is a rendering, not a radiograph's intensities.
- multi-frame grey objects: the first frame is read and the row flagged ``multi_frame:N``; which frame
  a user meant cannot be known, and refusing would hide a usable first image.

Importing this module registers the decoder with :mod:`cxrvit.data.images`, so ``read_grey``,
``cxrvit prepare`` and ``cxrvit predict`` accept DICOM files wherever they accept PNGs.
"""
from __future__ import annotations

import os
import struct
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cxrvit.data import images
from cxrvit.data.images import ImageReadError

GREY_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
#: Three-sample colour models pydicom converts to RGB; the reader turns them into grey.
COLOUR_PHOTOMETRIC = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")

# VRs an explicit-VR file without a preamble can start with (its first element is group 0002/0008).
_EXPLICIT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB",
                 b"OD", b"OF", b"OL", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"TM", b"UI", b"UL",
                 b"UN", b"US", b"UT", b"UC", b"UR", b"OV", b"SV", b"UV"}


#: How pydicom's warning starts when a file ends before the delimiter of an undefined-length element.
_EOF_WARNING = "End of file reached before delimiter"


def sniff_dicom(head: bytes) -> bool:
    """True for a DICOM Part 10 file ('DICM' at offset 128) or a headerless (no preamble) dataset.

    Old archives, including parts of the NIH DICOM copy, hold bare datasets: no preamble, first
    element in group 0x0002 or 0x0008, little endian. We accept one when its first element's
    tag is in those groups and its length field is plausible for either VR encoding.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    if head[4:6] in _EXPLICIT_VRS:  # explicit VR, little or big endian (old archives hold both)
        return any(struct.unpack(order + "H", head[:2])[0] in (0x0002, 0x0008) for order in "<>")
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x1FFF:
        return False
    (length,) = struct.unpack("<I", head[4:8])  # implicit VR: a 4-byte length
    return length < 1024 or length == 0xFFFFFFFF


def _read_dataset(path: Path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    try:
        # catch_warnings swaps process-wide state: fine where cxrvit decodes (one thread per process: prepare's
        # worker processes, predict, serve's single inference thread); a caller decoding DICOMs from several threads
        # of one process could see another thread's truncation warning here.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # force=True reads preamble-less files; sniff_dicom has already vouched for the content.
            ds = pydicom.dcmread(str(path), force=True, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, struct.error) as exc:
        raise ImageReadError(path, f"not a readable DICOM dataset: {exc}") from exc
    for w in caught:
        if str(w.message).startswith(_EOF_WARNING):
            # pydicom only warns when a file ends inside an undefined-length element (encapsulated pixel data, a
            # sequence) and hands back an empty dataset: without this, a half-copied file reads as "no pixel data".
            raise ImageReadError(path, f"truncated DICOM file: it ends ({path.stat().st_size:,} bytes) inside its "
                                       "compressed pixel data or a sequence")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # the others, as without the catch
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # A bare dataset names no transfer syntax; pydicom worked out the encoding while parsing it,
        # and uncompressed is the only possibility without an encapsulation header.
        implicit, little = ds.original_encoding
        if not hasattr(ds, "file_meta"):
            ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _check_single_grey_frame(path: Path, ds: pydicom.Dataset) -> None:
    """Refuse what cannot be made one grey radiograph, before spending time on decoding it."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = ds.get("SOPClassUID")
        kind = sop.name if sop is not None and hasattr(sop, "name") else "unknown SOP class"
        if "Image Storage" in kind:
            # An image SOP class must carry pixel data, so the header is there and the pixels are not: most likely
            # a copy cut short between two elements, which pydicom reads without a sign (an RT plan, by contrast,
            # has no pixels by design).
            raise ImageReadError(path, f"DICOM object has no pixel data although its class ({kind}) requires "
                                       f"them: the file ({path.stat().st_size} bytes) is probably truncated")
        raise ImageReadError(path, f"DICOM object has no pixel data ({kind})")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    colour = samples == 3 and photometric in COLOUR_PHOTOMETRIC
    if not colour and (samples != 1 or (photometric and photometric not in GREY_PHOTOMETRIC)):
        raise ImageReadError(
            path, f"colour DICOM refused (PhotometricInterpretation={photometric or '?'}, "
                  f"SamplesPerPixel={samples}); a chest radiograph is MONOCHROME1/2, and RGB/YBR are "
                  "converted to grey, but a palette or other colour model is a rendering, not intensities")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise ImageReadError(path, f"DICOM has no image size (Rows={rows}, Columns={cols})")
    if rows * cols > images.MAX_PIXELS:
        raise ImageReadError(path, f"{cols}x{rows} exceeds the {images.MAX_PIXELS}-pixel limit")


def _stored_values(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        ds.pixel_array_options(index=0)  # the first frame only (QC flags multi_frame:N)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for truncated or undecodable data
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        name = getattr(ts, "name", ts) or "unknown transfer syntax"
        raise ImageReadError(path, f"cannot decode DICOM pixel data ({name}): {exc}") from exc
    if arr.ndim == 3 and arr.shape[-1] == 3 and int(ds.get("SamplesPerPixel", 1) or 1) == 3:
        # pydicom returns RGB (YBR converted); ITU-R 601 luma, as PIL's convert("L") does for PNGs.
        luma = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        if arr.dtype.kind in "ui":  # keep the integer type, so 8-bit stays 8-bit as for grey files
            info = np.iinfo(arr.dtype)
            return np.clip(np.rint(luma), info.min, info.max).astype(arr.dtype)
        return luma.astype(np.float32)
    if arr.ndim != 2:
        raise ImageReadError(path, f"DICOM pixel data has shape {arr.shape}, expected one 2-D grey frame")
    bits_stored = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or arr.dtype.itemsize * 8)
    unsigned = int(ds.get("PixelRepresentation", 0) or 0) == 0
    if unsigned and arr.dtype.kind == "u" and bits_stored < arr.dtype.itemsize * 8:
        # pydicom sign-extends signed data itself; unsigned data keeps whatever sits above BitsStored.
        arr = arr & np.array((1 << bits_stored) - 1, dtype=arr.dtype)
    return arr


def _check_numbers(path: Path, ds: pydicom.Dataset, keywords: tuple[str, ...]) -> None:
    """Refuse, naming the tag and its value, a rescale or window value that is not a number: the display chain
    computes with it (the header summary only notes such a value, see :func:`_numbers`)."""
    problems: list[str] = []
    for keyword in keywords:
        _numbers(ds, keyword, 1, problems)
    bad = [p for p in problems if p.endswith("is not a number")]
    if bad:
        raise ImageReadError(path, "; ".join(bad) + ", so the pixel values cannot be rescaled or windowed")


def decode_dicom(path: os.PathLike | str) -> np.ndarray:
    """Decode one DICOM radiograph to a 2-D MONOCHROME2 array (see the module docstring)."""
    path = Path(path)
    ds = _read_dataset(path)
    _check_single_grey_frame(path, ds)
    arr = _stored_values(path, ds)
    bits_stored = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or arr.dtype.itemsize * 8)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    _check_numbers(path, ds, ("RescaleSlope", "RescaleIntercept")
                   + (() if photometric in COLOUR_PHOTOMETRIC else ("WindowCenter", "WindowWidth")))

    has_modality_lut = "ModalityLUTSequence" in ds or (
        float(ds.get("RescaleSlope", 1) or 1) != 1.0 or float(ds.get("RescaleIntercept", 0) or 0) != 0.0)
    # The VOI LUT is part of the grey-scale chain only: DICOM (PS3.3 C.11.2) has colour images ignore it,
    # and a colour secondary capture often carries a window it copied from the grey original.
    has_voi = photometric not in COLOUR_PHOTOMETRIC and (
        "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds))
    inverted = photometric == "MONOCHROME1"

    if not has_modality_lut and not has_voi:
        # Plain stored values: keep the integer type so an 8-bit image is not needlessly rescaled
        # (the NIH DX copy then decodes to exactly the PNG's pixels).
        if inverted:
            if arr.dtype.kind == "u":
                arr = np.array((1 << bits_stored) - 1, dtype=arr.dtype) - arr
            else:
                arr = arr.max() + arr.min() - arr
        return np.ascontiguousarray(arr)

    out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if has_voi:
        out = np.asarray(apply_voi_lut(out, ds, index=0), dtype=np.float64)
    if inverted:
        # to_uint8 scales min..max to 0..255, so reflecting within the data range is the exact negative.
        out = out.max() + out.min() - out
    if not np.isfinite(out).all():
        raise ImageReadError(path, "DICOM pixel data has non-finite values after the LUTs")
    return out.astype(np.float32)


# -- header summary (cxrvit dicom-info, QC) ---------------------------------------------------

@dataclass
class DicomHeader:
    """The header fields a CXR reader looks at first. Missing fields are ``None``."""

    path: str
    patient_name: str | None
    patient_id: str | None
    age: str | None
    sex: str | None
    modality: str | None
    body_part: str | None
    view_position: str | None
    rows: int | None
    columns: int | None
    frames: int
    bits_allocated: int | None
    bits_stored: int | None
    pixel_representation: int | None
    photometric: str | None
    samples_per_pixel: int | None
    pixel_spacing: list[float] | None
    spacing_source: str | None
    transfer_syntax: str | None
    transfer_syntax_uid: str | None
    sop_class: str | None
    series_description: str | None
    study_description: str | None
    has_window: bool
    rescale: list[float] | None
    #: header values that could not be read (their field is then ``None``), e.g. a non-numeric PixelSpacing
    header_problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        return None
    return str(value).strip()


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _numbers(ds: pydicom.Dataset, keyword: str, expected: int, problems: list[str]) -> list[float] | None:
    """A decimal field's values as floats, or None when absent; a value that is not a number gives None and a
    note in ``problems`` (a header summary must not fail on one glitch). Fewer values than ``expected`` are
    kept, and noted: a one-value PixelSpacing still says the scale."""
    value = ds.get(keyword)
    values = list(value) if isinstance(value, MultiValue) else [value]
    if value is None or not values or str(value).strip() == "":
        return None
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        shown = "\\".join(map(str, values))  # as the header stores it
        problems.append(f"{keyword} '{shown}' is not a number")
        return None
    if len(numbers) < expected:
        problems.append(f"{keyword} has {len(numbers)} value(s), expected {expected}")
    return numbers


def read_header(path: os.PathLike | str) -> DicomHeader:
    """Read the header summary of a DICOM file without decoding its pixels.

    Raises :class:`ImageReadError` naming the file when the header cannot be read at all."""
    path = Path(path)
    try:
        return _header_summary(path, _read_dataset(path, stop_before_pixels=True))
    except ImageReadError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed values; the caller needs the file named
        raise ImageReadError(path, f"unreadable DICOM header ({type(exc).__name__}: {exc})") from exc


def _header_summary(path: Path, ds: pydicom.Dataset) -> DicomHeader:
    problems: list[str] = []
    spacing, source = None, None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = _numbers(ds, keyword, 2, problems)
        if spacing:
            source = keyword
            break
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    sop = ds.get("SOPClassUID")
    slope, intercept = _numbers(ds, "RescaleSlope", 1, problems), _numbers(ds, "RescaleIntercept", 1, problems)
    return DicomHeader(
        path=str(path),
        patient_name=_text(ds, "PatientName"),
        patient_id=_text(ds, "PatientID"),
        age=_text(ds, "PatientAge"),
        sex=_text(ds, "PatientSex"),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        frames=_int(ds, "NumberOfFrames") or 1,
        bits_allocated=_int(ds, "BitsAllocated"),
        bits_stored=_int(ds, "BitsStored"),
        pixel_representation=_int(ds, "PixelRepresentation"),
        photometric=_text(ds, "PhotometricInterpretation"),
        samples_per_pixel=_int(ds, "SamplesPerPixel"),
        pixel_spacing=spacing or None,
        spacing_source=source,
        transfer_syntax=getattr(ts, "name", None) if ts is not None else None,
        transfer_syntax_uid=str(ts) if ts is not None else None,
        sop_class=getattr(sop, "name", str(sop)) if sop is not None else None,
        series_description=_text(ds, "SeriesDescription"),
        study_description=_text(ds, "StudyDescription"),
        has_window=("WindowCenter" in ds and "WindowWidth" in ds) or "VOILUTSequence" in ds,
        rescale=[slope[0], intercept[0]] if slope and intercept else None,
        header_problems=problems,
    )


def is_dicom_file(path: os.PathLike | str) -> bool:
    """Content sniff (not the extension) for one path."""
    with open(path, "rb") as fh:
        return sniff_dicom(fh.read(256))


images.register_decoder(images.Decoder("dicom", sniff_dicom, decode_dicom))
