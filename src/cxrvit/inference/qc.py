"""Input quality control: say when an input is probably not what the model was trained on.

The classifier was trained on frontal (PA/AP) chest radiographs. It will happily return
probabilities for an abdominal film, a CT secondary capture or a lateral view, and those numbers
mean nothing; so ``cxrvit predict`` scores every readable image but attaches *flags* that say
why its output should not be trusted. Flags come from two places:

- the DICOM header, when there is one: Modality, BodyPartExamined, ViewPosition, and what the reader
  had to do to get one grey image (first of several frames, colour converted to grey);
- the decoder: a PNG/JPEG stored rotated or mirrored and turned upright by its EXIF orientation tag;
- the decoded pixels: size, aspect ratio, an (almost) blank image, and a contrast test for
  a picture that looks inverted (MONOCHROME1 data mislabelled as MONOCHROME2, or the reverse).

Flags are short ``name`` or ``name:detail`` strings so they can be ';'-joined in a CSV cell.
:func:`dicom_summary` puts a DICOM file's header and its flags together (``cxrvit dicom-info``, ``serve``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrvit.data import images
from cxrvit.data.dicom import read_header
from cxrvit.data.images import ImageReadError

#: Modalities that produce projection radiographs. ``OT`` (other), CT, MR, US... are flagged.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
#: BodyPartExamined values (upper-cased) that mean chest. Sites write many spellings.
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "TORAX", "THORAX_CHEST", "CHEST_LAT",
                              "PORT CHEST", "PORT_CHEST", "CHEST PA", "CHEST AP", "CHESTPA", "CHESTAP"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LEFT LATERAL", "RIGHT LATERAL"})
FRONTAL_VIEWS = frozenset({"PA", "AP", "AP SUPINE", "APS", "PAS"})

#: Long side / short side above which the image is unlikely to be a whole chest film.
MAX_ASPECT = 1.6
#: Threshold on :func:`inversion_score`. On the real data in ../shared the score of correctly
#: displayed frontal CXRs ranged from -0.71 (min of 1,099 NIH) and -0.35 (min of 243 Hannover)
#: up; the relabelled MONOCHROME1 SIIM twin scored -1.65. -1.0 flagged none of the 1,342 real
#: images and caught the inverted one (see docs/inference.md).
INVERSION_THRESHOLD = -1.0


@dataclass(frozen=True)
class HeaderFacts:
    """The header fields QC reads (a subset of :class:`cxrvit.data.dicom.DicomHeader`)."""

    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    series_description: str | None = None
    frames: int = 1
    photometric: str | None = None

    @classmethod
    def from_header(cls, h) -> "HeaderFacts":
        """From a :class:`cxrvit.data.dicom.DicomHeader`."""
        return cls(h.modality, h.body_part, h.view_position, h.series_description, h.frames, h.photometric)


def header_flags(facts: HeaderFacts) -> list[str]:
    flags = []
    modality = (facts.modality or "").strip().upper()
    if not modality:
        flags.append("no_modality")
    elif modality not in RADIOGRAPH_MODALITIES:
        flags.append(f"not_radiograph:{modality}")
    body = (facts.body_part or "").strip().upper()
    if body and body not in CHEST_BODY_PARTS and "CHEST" not in body and "THORA" not in body:
        flags.append(f"not_chest:{body}")
    view = (facts.view_position or "").strip().upper()
    series = (facts.series_description or "").strip().upper()
    if view in LATERAL_VIEWS or (not view and "LAT" in series.replace("PLATE", "")):
        flags.append("lateral_view")
    elif view and view not in FRONTAL_VIEWS:
        flags.append(f"unusual_view:{view}")
    if facts.frames > 1:
        flags.append(f"multi_frame:{facts.frames}")  # the reader scored the first frame only
    photometric = (facts.photometric or "").strip().upper()
    # A colour object is read as grey luma; PALETTE COLOR is refused by the reader (a pseudo-colour rendering,
    # cxrvit.data.dicom), so nothing was converted and the flag would claim what did not happen.
    if photometric and not photometric.startswith("MONOCHROME") and photometric != "PALETTE COLOR":
        flags.append(f"colour_converted:{photometric}")
    return flags


def decode_flags(info: dict) -> list[str]:
    """Flags from what the reader did (:func:`cxrvit.data.images.read_grey_info`): ``exif_rotated:N`` when a
    PNG/JPEG's EXIF Orientation tag N (2..8) made it turn the stored pixels upright before scoring."""
    orientation = int(info.get("exif_orientation", 1) or 1)
    return [f"exif_rotated:{orientation}"] if orientation != 1 else []


def inversion_score(square: np.ndarray) -> float:
    """Mediastinum minus lungs, in units of the image's standard deviation.

    On a correctly displayed frontal CXR (MONOCHROME2) the mediastinum and spine in the middle
    are bright and the lung fields either side are dark, so the score is positive. ``square`` is
    the padded, resized uint8 image the model sees.
    """
    a = square.astype(np.float32)
    s = a.shape[0]

    def region(r0: float, r1: float, c0: float, c1: float) -> float:
        return float(a[int(r0 * s):int(r1 * s), int(c0 * s):int(c1 * s)].mean())

    mediastinum = region(0.30, 0.80, 0.45, 0.55)
    lungs = 0.5 * (region(0.30, 0.60, 0.20, 0.35) + region(0.30, 0.60, 0.65, 0.80))
    return (mediastinum - lungs) / (float(a.std()) + 1e-6)


def pixel_flags(original_shape: tuple[int, int], square: np.ndarray) -> list[str]:
    """Flags from the decoded image (``original_shape``) and the square it is fitted to for scoring.

    ``low_resolution`` is relative to the model, not to an absolute number: the image is padded to a
    square and resized so its long side becomes ``square.shape[0]`` (``preprocessing.square_size``: the side
    the model's training images were cached at when the bundle records it, else the model's input side). Only
    when the long side is shorter than that is the picture *upscaled*, i.e. holds less detail than
    the model was trained to see. A fixed minimum (it was 256 px) flagged every image of a model run
    at 128 px on 160-px inputs -- a flag on every row that users learn to ignore.
    """
    flags = []
    h, w = original_shape
    if max(h, w) < square.shape[0]:
        flags.append(f"low_resolution:{w}x{h}<{square.shape[0]}")
    if max(h, w) / max(1, min(h, w)) > MAX_ASPECT:
        flags.append(f"unusual_aspect:{w}x{h}")
    if float(square.std()) < 4.0:  # out of 255: practically one grey level
        flags.append("blank_image")
        return flags
    if inversion_score(square) < INVERSION_THRESHOLD:
        flags.append("possibly_inverted")
    return flags


def dicom_summary(path: Path, decode: bool = True) -> dict:
    """A DICOM file's header summary plus QC flags (pixel checks too when ``decode``, at the default 224 px):
    what ``cxrvit dicom-info`` prints and ``cxrvit serve`` shows beside an uploaded DICOM."""
    h = read_header(path)
    flags = header_flags(HeaderFacts.from_header(h))
    decode_error = None
    if decode:
        try:
            arr = images.read_grey(path)
        except ImageReadError as exc:  # the header is still worth printing
            decode_error = exc.reason
        else:
            flags += pixel_flags(arr.shape, images.square_resize(arr, 224))
    return {
        **h.to_dict(),
        "size": (f"{h.columns}x{h.rows}" + (f"x{h.frames} frames" if h.frames > 1 else "")
                 if h.rows and h.columns else None),
        "bits": (f"{h.bits_stored}/{h.bits_allocated}" + (" signed" if h.pixel_representation == 1 else "")
                 if h.bits_allocated else None),
        "spacing": (" x ".join(f"{v:g}" for v in h.pixel_spacing) + f" ({h.spacing_source})"
                    if h.pixel_spacing else None),
        "qc": flags,
        "decode_error": decode_error,
    }
