"""Find image files under a data folder and reconcile them with the metadata's listing.

NIH ships its images as ``images/*.png``; Kaggle's mirror splits them over
``images_001/images/…`` … ``images_012/images/…``; users unpack one archive of twelve, or
rename folders. So images are found anywhere below the data folder and matched by *file
name*, which is the key ``Data_Entry_2017.csv`` uses. What does not match is counted and
reported, never dropped without a word: a user with 1 of 12 archives can work with what
they have, and sees that they are doing so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from cxrvit.data.dicom import read_header
from cxrvit.data.images import ImageReadError, sniff_format

#: Extensions looked at when walking a folder (content is sniffed later; this only limits the walk).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
EXAMPLES = 5


@dataclass
class FoundImages:
    """Image files under ``root``: ``paths[name]`` is the path relative to ``root``."""

    root: Path
    paths: dict[str, str]
    #: names seen more than once (the first path in sorted order is used): name -> all paths
    duplicates: dict[str, list[str]] = field(default_factory=dict)
    #: files whose content is an image but whose name has none of :data:`IMAGE_EXTENSIONS` (not indexed; reported)
    ignored: list[str] = field(default_factory=list)


def find_images(root: os.PathLike | str, exclude: Iterable[os.PathLike | str] = ()) -> FoundImages:
    """Walk ``root`` and index image files by file name.

    Symlinked folders are followed: ``images/`` linked in from another disk is a common layout, and
    skipping it would report every image in it as "not downloaded". Each folder is walked once, by its
    resolved real path, so a symlink loop (or a second link to a folder already walked) ends the walk there
    instead of going round forever or counting its images twice.

    ``exclude``: folders to skip, e.g. a cache being written inside the data folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found")
    skip = {Path(p).resolve() for p in exclude}
    visited: set[Path] = set()
    seen: dict[str, list[str]] = {}
    ignored: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = here.resolve()
        if real in visited:  # reached again through a link: a loop, or a folder already indexed
            dirnames[:] = []
            continue
        visited.add(real)
        # Sorted, pruned walk: the result must not depend on the file system's listing order.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in skip)
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            if Path(fname).suffix.lower() not in IMAGE_EXTENSIONS:
                if _is_image(here / fname):  # e.g. a DICOM named IM0001: said, not silently passed over
                    ignored.append((here / fname).relative_to(root).as_posix())
                continue
            seen.setdefault(fname, []).append((here / fname).relative_to(root).as_posix())
    paths = {name: sorted(p)[0] for name, p in seen.items()}
    duplicates = {name: sorted(p) for name, p in seen.items() if len(p) > 1}
    return FoundImages(root=root, paths=dict(sorted(paths.items())), duplicates=duplicates, ignored=ignored)


def _is_image(path: Path) -> bool:
    try:
        return sniff_format(path) is not None
    except OSError:  # a broken link, a file that cannot be opened: not an image the walk could have used
        return False


@dataclass
class IndexReport:
    """How the images on disk line up with the images the metadata lists."""

    present: list[str]  # listed and found: these are used
    listed_absent: list[str]  # listed, not found (e.g. archives not downloaded)
    unlisted_present: list[str]  # found, not listed (not used: they carry no labels)
    duplicates: dict[str, list[str]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not (self.listed_absent or self.unlisted_present or self.duplicates)

    def lines(self) -> list[str]:
        """Human-readable report, counts plus a few examples of each problem."""
        out = [f"{len(self.present):,} listed images found"]
        if self.listed_absent:
            out.append(
                f"{len(self.listed_absent):,} listed images are absent (not downloaded?), "
                f"e.g. {', '.join(self.listed_absent[:EXAMPLES])}"
            )
        if self.unlisted_present:
            out.append(
                f"{len(self.unlisted_present):,} image files are not in the metadata and are not used, "
                f"e.g. {', '.join(self.unlisted_present[:EXAMPLES])}"
            )
        if self.duplicates:
            name, paths = next(iter(self.duplicates.items()))
            out.append(
                f"{len(self.duplicates):,} file names occur more than once (the first path is used), "
                f"e.g. {name}: {', '.join(paths)}"
            )
        return out

    def to_meta(self) -> dict:
        return {
            "listed_present": len(self.present),
            "listed_absent": len(self.listed_absent),
            "listed_absent_examples": self.listed_absent[:EXAMPLES],
            "unlisted_present": len(self.unlisted_present),
            "unlisted_present_examples": self.unlisted_present[:EXAMPLES],
            "duplicate_names": len(self.duplicates),
            "duplicate_examples": {k: v for k, v in list(self.duplicates.items())[:EXAMPLES]},
        }


def reconcile(listed: Iterable[str], found: FoundImages) -> IndexReport:
    """Match listed image names against found files (all lists sorted by name)."""
    listed_set = set(listed)
    present = sorted(n for n in listed_set if n in found.paths)
    absent = sorted(n for n in listed_set if n not in found.paths)
    unlisted = sorted(n for n in found.paths if n not in listed_set)
    return IndexReport(present=present, listed_absent=absent, unlisted_present=unlisted, duplicates=found.duplicates)


# --------------------------------------------------------------------------------------------
# The cache's index table (one row per image to be cached), see docs/architecture.md.

META_COLUMNS = ("image", "patient_id", "view", "age", "sex", "follow_up", "official_split", "path")


def labelled_table(entry_table: pd.DataFrame, found: FoundImages, report: IndexReport,
                   split_lists: dict[str, list[str]]) -> pd.DataFrame:
    """Rows for the listed images that are present, sorted by name, with split membership and path."""
    table = entry_table[entry_table["image"].isin(set(report.present))].sort_values("image", kind="stable")
    table = table.reset_index(drop=True)
    split = pd.Series("", index=table.index, dtype=object)
    names = table["image"]
    train_val, test = set(split_lists.get("train_val", ())), set(split_lists.get("test", ()))
    both = sorted(train_val & test)
    if both:
        raise ValueError(f"the official split lists name {len(both)} image(s) in both train_val and test, e.g. {both[0]}")
    split[names.isin(train_val).to_numpy()] = "train_val"
    split[names.isin(test).to_numpy()] = "test"
    table.insert(6, "official_split", split.to_numpy())
    table.insert(7, "path", [found.paths[n] for n in names])
    return table


DICOM_EXTENSIONS = (".dcm", ".dicom")


def unlabelled_table(found: FoundImages, patients=None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows for every image found (no labels), and how many patient IDs came from where.

    An image's patient ID (and view) comes from ``patients`` (optional, from :func:`read_patients`) when it
    names the image; else, for a DICOM file, from its header's PatientID (and ViewPosition), because a folder
    of DICOMs holds several images per patient and one patient per file would leak patients across splits;
    else from the file stem. The counts have the keys ``"csv"``, ``"dicom"`` and ``"stem"``.
    """
    names = list(found.paths)
    table = pd.DataFrame({"image": names})
    pid = [Path(n).stem for n in names]
    view = [""] * len(names)
    counts = {"csv": 0, "dicom": 0, "stem": 0}
    by_name = patients.set_index("image") if patients is not None else None
    for i, name in enumerate(names):
        listed = next((k for k in (name, Path(name).stem) if by_name is not None and k in by_name.index), None)
        if listed is not None:
            pid[i], view[i] = by_name.at[listed, "patient_id"], by_name.at[listed, "view"]
            counts["csv"] += 1
            continue
        is_dicom = Path(name).suffix.lower() in DICOM_EXTENSIONS
        ids = _dicom_ids(found.root / found.paths[name]) if is_dicom else None
        if ids is not None:
            pid[i], view[i] = ids
            counts["dicom"] += 1
        else:
            counts["stem"] += 1
    table["patient_id"] = pid
    table["view"] = view
    table["age"] = pd.array([None] * len(names), dtype="Int64")
    table["sex"] = ""
    table["follow_up"] = pd.array([None] * len(names), dtype="Int64")
    table["official_split"] = ""
    table["path"] = [found.paths[n] for n in names]
    return table, counts


def _dicom_ids(path: Path) -> tuple[str, str] | None:
    """``(PatientID, ViewPosition)`` from a DICOM header (pixel data not read); None without a PatientID."""
    try:
        header = read_header(path)
    except ImageReadError:
        return None  # an unreadable file falls back to its stem; decoding it reports the problem
    if not header.patient_id:
        return None
    return header.patient_id, (header.view_position or "").upper()


_IMAGE_KEYS = ("image", "image_id", "Image Index", "file", "filename")
_PATIENT_KEYS = ("patient_id", "Patient ID", "patient")
_VIEW_KEYS = ("view", "View Position", "projection")


def read_patients(path: os.PathLike | str) -> pd.DataFrame:
    """A CSV mapping image names (with or without extension) to patient IDs, and optionally views."""
    path = Path(path)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise ValueError(f"{path}: empty file, expected a CSV with a header line") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot parse as CSV: {str(exc).strip()}") from exc
    pick = lambda keys: next((k for k in keys if k in raw.columns), None)  # noqa: E731
    image_col, patient_col, view_col = pick(_IMAGE_KEYS), pick(_PATIENT_KEYS), pick(_VIEW_KEYS)
    if image_col is None or patient_col is None:
        raise ValueError(
            f"{path}: needs an image column (one of {_IMAGE_KEYS}) and a patient column (one of {_PATIENT_KEYS}); "
            f"found {list(raw.columns)}"
        )
    out = pd.DataFrame({"image": raw[image_col].str.strip(), "patient_id": raw[patient_col].str.strip()})
    out["view"] = raw[view_col].str.strip().str.upper() if view_col else ""
    dup = out["image"].duplicated()
    if dup.any():
        raise ValueError(f"{path}, line {int(dup.to_numpy().nonzero()[0][0]) + 2}: image {out['image'][dup].iloc[0]!r} listed twice")
    return out
