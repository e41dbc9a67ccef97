"""``cxrvit predict``: score image files with a model bundle, one row per file, never stopping early.

Pipeline per file: ``read_grey`` (content-sniffed PNG/JPEG/DICOM, EXIF orientation applied) -> QC flags ->
the cache's geometry (``square_resize`` to ``preprocessing.square_size``: the side the model's training and
validation images were cached at when the bundle records it, else the model's) -> batched ``predict_proba``,
whose scoring pass resizes that uint8 square to the model size exactly as validation resized the cache's. So a
file scores as its row of a cache prepared at that size does. A file that cannot be read, or whose reading
fails in any other way (out of memory included), gets ``status=error`` and its reason; every other file is still
scored, and the caller turns "any error" into the exit code. :class:`PredictionWriter` writes rows as their
batch finishes, so an interrupted run keeps what it scored.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TextIO

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cxrvit.data import images
from cxrvit.data.dicom import is_dicom_file, read_header
from cxrvit.data.images import ImageReadError, PixelLimitError
from cxrvit.inference import qc
from cxrvit.inference.bundle import Bundle

#: Extensions a folder walk treats as images even when their content turns out to be broken, so
#: that a corrupt ``.png`` is reported. Other files are kept only if their content sniffs as an image.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic"})


@dataclass
class Prediction:
    path: str
    status: str = "ok"  # "ok" or "error"
    error: str = ""
    qc_flags: list[str] = field(default_factory=list)
    probs: dict[str, float] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": self.path, "status": self.status, "error": self.error, "qc_flags": self.qc_flags,
                "probs": self.probs, "findings": self.findings}


# -- inputs ----------------------------------------------------------------------------------------

def _looks_like_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        return images.sniff_format(path) is not None
    except OSError:
        return False


def _read_list(path: Path) -> list[Path]:
    """A text file of paths, one a line; relative paths are relative to the list's folder.

    Raises ValueError naming the list when it cannot be read as text."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read this list of paths (text, one path a line): {exc}") from exc
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            out.append(p if p.is_absolute() else path.parent / p)
    return out


def collect_inputs(inputs: Iterable[os.PathLike | str]) -> list[Path]:
    """Expand files, folders (recursively, sorted) and ``.txt`` path lists into a list of files.

    A path given explicitly is always kept, even when it does not exist, so that it is reported
    as an error rather than silently dropped. Hidden files in folders are skipped. A list that cannot
    be read raises ValueError naming it.
    """
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            for child in sorted(p.rglob("*")):
                rel = child.relative_to(p).parts
                if child.is_file() and not any(part.startswith(".") for part in rel) and _looks_like_image(child):
                    files.append(child)
        elif p.is_file() and p.suffix.lower() in (".txt", ".lst") and images.sniff_format(p) is None:
            files.extend(collect_inputs(_read_list(p)))
        else:
            files.append(p)
    seen: set[Path] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


# -- reading and QC ----------------------------------------------------------------------------------

@dataclass
class LoadedImage:
    path: Path
    #: uint8 [P, P]: the file in the cache's geometry at the bundle's ``preprocessing.square_size`` (what a cache
    #: prepared at that size holds for it); the scoring pass resizes it to the model size.
    square: np.ndarray
    flags: list[str]
    display: np.ndarray | None = None  # the same picture at a larger size, for heat-map overlays
    #: Where the image lies in ``square`` (and ``display``): top, left, bottom, right as fractions of the side.
    placement: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


def dicom_header_flags(path: Path) -> list[str]:
    if not is_dicom_file(path):
        return []
    h = read_header(path)
    return qc.header_flags(qc.HeaderFacts.from_header(h))


def check_pixel_count(path: Path, max_pixels: int) -> None:
    """Decompression-bomb guard from the header alone, before any pixel is decoded."""
    fmt = images.sniff_format(path)
    if fmt == "dicom" or (fmt is None and is_dicom_file(path)):
        h = read_header(path)
        w, hgt = h.columns or 0, h.rows or 0
    elif fmt in ("png", "jpeg"):
        try:
            with Image.open(path) as img:  # lazy: reads the header only
                w, hgt = img.size
        except Image.DecompressionBombError as exc:
            raise PixelLimitError(path, f"refused as a decompression bomb (over the limit of {max_pixels} "
                                        f"pixels): {exc}", max_pixels) from exc
        except (OSError, SyntaxError) as exc:
            raise ImageReadError(path, f"unreadable {fmt} header: {exc}") from exc
    else:
        return  # read_grey reports what it is
    if w * hgt > max_pixels:
        raise PixelLimitError(path, f"{w}x{hgt} = {w * hgt} pixels exceeds the limit of {max_pixels} "
                                    "(decompression-bomb guard)", max_pixels)


def load_for_model(path: Path, size: int, max_pixels: int = images.MAX_PIXELS,
                   fix_inverted: bool = True, display_size: int | None = None) -> LoadedImage:
    """Decode, QC and fit one file to a ``size`` square (a bundle's ``preprocessing.square_size``); raises
    ImageReadError with the file's name on any failure (PixelLimitError over ``max_pixels``).

    With ``fix_inverted``, an image that QC finds inverted (a negative: typically MONOCHROME1 pixel
    data labelled MONOCHROME2 or the reverse) is turned back into a positive before scoring, and
    the row says so with the extra flag ``auto_inverted``.
    """
    if path.is_file() and path.stat().st_size > 0:
        check_pixel_count(path, max_pixels)
    arr, info = images.read_grey_info(path)
    square = images.square_resize(arr, size)
    flags = dicom_header_flags(path) + qc.decode_flags(info) + qc.pixel_flags(arr.shape, square)
    if fix_inverted and "possibly_inverted" in flags:
        arr = 255 - images.to_uint8(arr)  # invert before padding, so that the padding stays dark
        square = images.square_resize(arr, size)
        flags.append("auto_inverted")
    display = images.square_resize(arr, display_size) if display_size else None
    return LoadedImage(path, square, flags, display, images.square_placement(arr.shape))


# -- scoring -----------------------------------------------------------------------------------------

def score_batch(bundle: Bundle, squares: Sequence[np.ndarray], tta: bool | None = None) -> np.ndarray:
    """Probabilities for square uint8 images of one side (any: the pass resizes them to the model size in
    float, as validation resized the cache's), through the bundle's own validation pass."""
    grey = torch.from_numpy(np.stack(squares)).unsqueeze(1)
    return bundle.predict_proba(grey, tta=tta).numpy()


def _batches(paths: Sequence[Path], size: int, batch_size: int, max_pixels: int,
             fix_inverted: bool, display_size: int | None) -> Iterator[tuple[list[Prediction], list[LoadedImage]]]:
    """Read files, yielding (every prediction row, the loaded images among them) in batches."""
    rows: list[Prediction] = []
    loaded: list[LoadedImage] = []
    for path in paths:
        try:
            img = load_for_model(path, size, max_pixels, fix_inverted, display_size)
        except Exception as exc:  # noqa: BLE001 -- one file's failure (MemoryError too) is that file's row
            rows.append(Prediction(str(path), status="error", error=file_error(path, exc)))
        else:
            rows.append(Prediction(str(path), qc_flags=img.flags))
            loaded.append(img)
        if len(loaded) == batch_size:
            yield rows, loaded
            rows, loaded = [], []
    if rows:
        yield rows, loaded


def file_error(path: Path, exc: BaseException) -> str:
    """A failed file's error cell: ImageReadError's own message (it names the file), else the file, the
    exception's type and its message."""
    if isinstance(exc, ImageReadError):
        return str(exc)
    detail = str(exc).strip()
    what = type(exc).__name__ + (": " + detail if detail else "")
    if isinstance(exc, MemoryError):
        what += " (not enough memory to decode it)"
    return f"{path}: {what}"


def predict_files(bundle: Bundle, paths: Sequence[os.PathLike | str], *, batch_size: int = 16, tta: bool | None = None,
                  progress: bool = True, max_pixels: int = images.MAX_PIXELS, fix_inverted: bool = True,
                  display_size: int | None = None,
                  on_batch: Callable[[list[LoadedImage], np.ndarray], None] | None = None,
                  on_rows: Callable[[list[Prediction]], None] | None = None) -> list[Prediction]:
    """Score ``paths`` with ``bundle``; one :class:`Prediction` per path, in order.

    ``on_batch(images, probs)`` is called after each scored batch (``cxrvit predict --heatmaps`` uses
    it to draw overlays without decoding the files twice; ``display_size`` keeps a larger copy of
    each image for them). ``on_rows(rows)`` gets each batch's finished rows, in order (a
    :class:`PredictionWriter`'s ``write``, so that rows reach the output as they are done).
    """
    paths = [Path(p) for p in paths]
    size = bundle.preprocessing.square_size
    out: list[Prediction] = []
    with tqdm(total=len(paths), unit="img", disable=not progress, desc="predict") as bar:
        for rows, loaded in _batches(paths, size, batch_size, max_pixels, fix_inverted, display_size):
            if loaded:
                probs = score_batch(bundle, [img.square for img in loaded], tta=tta)
                by_path = {str(img.path): p for img, p in zip(loaded, probs)}
                for row in rows:
                    if row.status == "ok":
                        p = by_path[row.path]
                        row.probs = {label: float(v) for label, v in zip(bundle.labels, p)}
                        row.findings = [label for label in bundle.labels
                                        if row.probs[label] >= bundle.thresholds.get(label, 0.5)]
                if on_batch is not None:
                    on_batch(loaded, probs)
            if on_rows is not None:
                on_rows(rows)
            out.extend(rows)
            bar.update(len(rows))
    return out


# -- output --------------------------------------------------------------------------------------------

class PredictionWriter:
    """Prediction rows to ``.csv`` (columns: path, status, error, qc_flags, prob_<label>..., findings) or
    ``.json`` (``{"labels": [...], "predictions": [...]}``, as ``json.dumps(indent=2)`` writes it), a batch at a
    time: each :meth:`write` is appended and flushed, so a run that stops keeps every row written so far.

    Opening creates the folder and the file, so an unusable ``out`` fails before any scoring. :meth:`close`
    (or leaving the ``with`` block, also on an exception) ends the JSON document; a CSV is whole after every
    write.
    """

    def __init__(self, out: os.PathLike | str, labels: Sequence[str]):
        self.path = Path(out)
        self.labels = list(labels)
        self.count = 0
        self.json = self.path.suffix.lower() == ".json"
        if not self.json and self.path.suffix.lower() != ".csv":
            raise ValueError(f"{self.path}: output must end in .csv or .json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: TextIO | None = open(self.path, "w", newline="")
        if self.json:
            # the document up to the list of predictions, exactly as json.dumps(indent=2) starts it
            self._fh.write(json.dumps({"labels": self.labels}, indent=2)[:-2] + ',\n  "predictions": [')
        else:
            self._csv = csv.writer(self._fh)
            self._csv.writerow(["path", "status", "error", "qc_flags", *(f"prob_{label}" for label in self.labels),
                                "findings"])
        self._fh.flush()

    def write(self, rows: Sequence[Prediction]) -> None:
        assert self._fh is not None, "write after close"
        for r in rows:
            if self.json:
                item = json.dumps(r.to_dict(), indent=2).replace("\n", "\n    ")
                self._fh.write(("," if self.count else "") + "\n    " + item)
            else:
                probs = [f"{r.probs[label]:.6f}" if label in r.probs else "" for label in self.labels]
                self._csv.writerow([r.path, r.status, r.error, ";".join(r.qc_flags), *probs, ";".join(r.findings)])
            self.count += 1
        self._fh.flush()

    def close(self) -> None:
        if self._fh is None:
            return
        if self.json:
            self._fh.write("\n  ]\n}" if self.count else "]\n}")
        self._fh.close()
        self._fh = None

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_predictions(rows: Sequence[Prediction], labels: Sequence[str], out: os.PathLike | str) -> Path:
    """Write ``rows`` at once (see :class:`PredictionWriter` for the formats)."""
    with PredictionWriter(out, labels) as writer:
        writer.write(rows)
    return writer.path
