"""Read NIH ChestX-ray14's metadata files: Data_Entry_2017, BBox_List_2017 and the split lists.

``Data_Entry_2017.csv`` was published twice and the two variants differ in ways a naive
parser gets wrong:

* the original 2017 file writes ages as ``060Y`` and ends every line with a comma (so pandas
  sees an extra, empty, unnamed column);
* the v2020 revision writes integer ages and has no trailing comma.

Both may be plain or gzipped. Anything outside NIH's vocabulary is an error that names the
file, the line and the offending column or label: a silently mislabelled image would poison
every number computed downstream.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrvit.labels import NIH_FINDINGS, NO_FINDING

#: File names NIH (and Kaggle) used for the metadata, in order of preference.
DATA_ENTRY_NAMES = (
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
)
SPLIT_LIST_NAMES = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
BBOX_NAMES = ("BBox_List_2017.csv", "BBox_List_2017.csv.gz")

#: Columns this package needs; the pixel-size columns are read but not required.
REQUIRED_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
)
VALID_LABELS = frozenset(NIH_FINDINGS) | {NO_FINDING}
LABEL_COLUMNS: tuple[str, ...] = NIH_FINDINGS + (NO_FINDING,)

# "060Y" (2017) or "60" (v2020). The 2017 file also has a handful of "M"/"D" ages (months, days).
_AGE_RE = re.compile(r"^\s*(\d+)\s*([YMD]?)\s*$", re.IGNORECASE)


class MetadataError(ValueError):
    """A metadata file is malformed. The message names the file, the line and the problem."""

    def __init__(self, path: os.PathLike | str, problem: str, line: int | None = None):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


def _read_csv(path: Path) -> pd.DataFrame:
    """Read a CSV (plain or .gz) as strings, without turning empty cells into NaN."""
    if not path.is_file():
        raise MetadataError(path, "file not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, compression="infer")
    except pd.errors.EmptyDataError as exc:
        raise MetadataError(path, "empty file, expected a CSV with a header line") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as exc:
        raise MetadataError(path, f"cannot parse as CSV: {exc}") from exc


def _line(row: int) -> int:
    """File line of data row ``row`` (0-based), counting the header as line 1."""
    return int(row) + 2


def parse_age(text: str) -> int | None:
    """``'060Y'`` -> 60, ``'60'`` -> 60, ``'018M'`` -> 1, ``''`` -> None; anything else raises ValueError."""
    if text is None or str(text).strip() == "":
        return None
    match = _AGE_RE.match(str(text))
    if not match:
        raise ValueError(f"unreadable age {text!r}")
    value, unit = int(match.group(1)), match.group(2).upper()
    return value // 12 if unit == "M" else value // 365 if unit == "D" else value


@dataclass(frozen=True)
class DataEntry:
    """The parsed Data_Entry file: one row per image, labels as 0/1 columns."""

    path: Path
    table: pd.DataFrame  # columns: image, patient_id, view, age, sex, follow_up, findings..., No Finding
    variant: str  # "2017" (060Y ages, trailing comma) or "v2020" (integer ages)

    def __len__(self) -> int:
        return len(self.table)


def read_data_entry(path: os.PathLike | str) -> DataEntry:
    """Parse ``Data_Entry_2017.csv`` (either variant, plain or gzipped) into a :class:`DataEntry`."""
    path = Path(path)
    raw = _read_csv(path)
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise MetadataError(
            path, f"missing required column(s) {missing}; found columns {list(raw.columns)}", line=1
        )
    # The 2017 variant's trailing comma shows up as an unnamed, all-empty last column.
    trailing = [c for c in raw.columns if c.startswith("Unnamed:") or c == ""]
    for col in trailing:
        bad = np.flatnonzero(raw[col].str.strip() != "")
        if len(bad):
            raise MetadataError(path, f"unexpected value {raw[col].iloc[bad[0]]!r} in an unnamed column", _line(bad[0]))

    images = raw["Image Index"].str.strip()
    empty = np.flatnonzero(images == "")
    if len(empty):
        raise MetadataError(path, "column 'Image Index' is empty", _line(empty[0]))
    dup = images.duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise MetadataError(path, f"image {images.iloc[row]!r} is listed twice (column 'Image Index')", _line(row))
    patients = raw["Patient ID"].str.strip()
    empty = np.flatnonzero(patients == "")
    if len(empty):
        raise MetadataError(path, "column 'Patient ID' is empty", _line(empty[0]))
    # NIH patient IDs are integers; normalise "00001" and "1" to one spelling.
    patients = patients.str.lstrip("0").replace("", "0")

    labels = _parse_findings(path, raw["Finding Labels"])
    ages_text = raw["Patient Age"]
    ages = _parse_ages(path, ages_text)
    variant = "2017" if ages_text.str.upper().str.endswith("Y").any() or trailing else "v2020"

    table = pd.DataFrame(
        {
            "image": images.to_numpy(dtype=object),
            "patient_id": patients.to_numpy(dtype=object),
            "view": raw["View Position"].str.strip().str.upper().to_numpy(dtype=object),
            "age": ages,
            "sex": raw["Patient Gender"].str.strip().str.upper().to_numpy(dtype=object),
            "follow_up": pd.array(_parse_ints(path, raw["Follow-up #"], "Follow-up #"), dtype="Int64"),
        }
    )
    for name in LABEL_COLUMNS:
        table[name] = labels[name]
    return DataEntry(path=path, table=table, variant=variant)


def _parse_findings(path: Path, column: pd.Series) -> dict[str, np.ndarray]:
    """``'Cardiomegaly|Effusion'`` -> one uint8 column per label; unknown labels raise."""
    parts = column.str.split("|").explode().str.strip()
    unknown = ~parts.isin(VALID_LABELS)
    if unknown.any():
        first = parts[unknown].index[0]
        raise MetadataError(
            path,
            f"unknown finding {parts[unknown].iloc[0]!r} in column 'Finding Labels' "
            f"(NIH's labels are: {', '.join(LABEL_COLUMNS)})",
            _line(first),
        )
    out = {}
    n = len(column)
    rows = parts.index.to_numpy()
    for name in LABEL_COLUMNS:
        col = np.zeros(n, dtype=np.uint8)
        col[rows[(parts == name).to_numpy()]] = 1
        out[name] = col
    # "No Finding" together with a finding is a contradiction, not a label set.
    clash = np.flatnonzero(out[NO_FINDING].astype(bool) & (sum(out[f] for f in NIH_FINDINGS) > 0))
    if len(clash):
        raise MetadataError(path, f"'No Finding' together with a finding: {column.iloc[clash[0]]!r}", _line(clash[0]))
    return out


def _parse_ages(path: Path, column: pd.Series) -> pd.array:
    """Vectorised :func:`parse_age` (112k rows): the same rules, the same errors."""
    parts = column.str.extract(_AGE_RE)
    bad = np.flatnonzero(parts[0].isna().to_numpy() & (column.str.strip() != "").to_numpy())
    if len(bad):
        raise MetadataError(path, f"column 'Patient Age': unreadable age {column.iloc[bad[0]]!r}", _line(bad[0]))
    value = pd.to_numeric(parts[0]).astype("Int64")
    unit = parts[1].fillna("").str.upper()
    return value.where(unit != "M", value // 12).where(unit != "D", value // 365).array


def _parse_ints(path: Path, column: pd.Series, name: str) -> list[int | None]:
    out = []
    for row, text in enumerate(column.str.strip().tolist()):
        if text == "":
            out.append(None)
        elif text.isdigit():
            out.append(int(text))
        else:
            raise MetadataError(path, f"column {name!r}: expected an integer, got {text!r}", _line(row))
    return out


def read_split_list(path: os.PathLike | str) -> list[str]:
    """One image name per line (NIH's ``train_val_list.txt`` / ``test_list.txt``)."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(path, "file not found")
    names = [line.strip() for line in path.read_text().splitlines()]
    return [n for n in names if n]


def read_bbox_list(path: os.PathLike | str) -> pd.DataFrame:
    """NIH's ``BBox_List_2017.csv``: columns image, finding, x, y, w, h (original 1024-px pixels)."""
    path = Path(path)
    raw = _read_csv(path)
    if raw.shape[1] < 6 or str(raw.columns[0]).strip() != "Image Index":
        raise MetadataError(
            path, f"expected 'Image Index, Finding Label, Bbox [x,y,w,h]' columns, found {list(raw.columns)}", line=1
        )
    out = pd.DataFrame({"image": raw.iloc[:, 0].str.strip(), "finding": raw.iloc[:, 1].str.strip()})
    # NIH spells it "Infiltrate" in the box list but "Infiltration" in Data_Entry; use one name.
    out["finding"] = out["finding"].replace({"Infiltrate": "Infiltration"})
    bad = np.flatnonzero(~out["finding"].isin(NIH_FINDINGS))
    if len(bad):
        raise MetadataError(path, f"unknown finding {out['finding'].iloc[bad[0]]!r} in column 'Finding Label'", _line(bad[0]))
    for i, key in enumerate("xywh"):
        values = pd.to_numeric(raw.iloc[:, 2 + i], errors="coerce")
        if values.isna().any():
            row = int(np.flatnonzero(values.isna())[0])
            raise MetadataError(path, f"box coordinate {key!r} is not a number: {raw.iloc[row, 2 + i]!r}", _line(row))
        out[key] = values.to_numpy(dtype=np.float64)
    return out


def _find_one(folder: Path, names: tuple[str, ...], depth: int = 3) -> Path | None:
    """The first of ``names`` in ``folder``, else in its subfolders up to ``depth`` levels down
    (shallowest first, then alphabetical). Bounded, so that 112k image files are never walked."""
    pattern = ""
    for _ in range(depth + 1):
        hits = sorted(p for name in names for p in folder.glob(pattern + name) if p.is_file())
        if hits:
            return min(hits, key=lambda p: (names.index(p.name), str(p)))
        pattern += "*/"
    return None


def find_data_entry(folder: os.PathLike | str) -> Path | None:
    """Locate the Data_Entry CSV in a data folder (either published name, .csv or .csv.gz)."""
    return _find_one(Path(folder), DATA_ENTRY_NAMES)


def find_split_lists(folder: os.PathLike | str) -> dict[str, Path]:
    """``{"train_val": path, "test": path}`` for the official split lists that exist in ``folder``."""
    found = {}
    for split, name in SPLIT_LIST_NAMES.items():
        hit = _find_one(Path(folder), (name,))
        if hit is not None:
            found[split] = hit
    return found
