"""Data_Entry_2017 parsing: both published variants, plain and gzipped, and errors that name the problem."""
from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrvit.data import nih
from cxrvit.labels import NIH_FINDINGS


def test_both_variants_parse_to_the_same_table(nih_dir: Path):
    old = nih.read_data_entry(nih_dir / "Data_Entry_2017.csv")
    new = nih.read_data_entry(nih_dir / "Data_Entry_2017_v2020.csv.gz")
    assert (old.variant, new.variant) == ("2017", "v2020")
    assert len(old) == len(new) == 15
    assert old.table.equals(new.table)
    row = old.table.set_index("image").loc["00000100_000.png"]
    assert (row["patient_id"], row["view"], row["age"], row["sex"], row["follow_up"]) == ("100", "PA", 60, "M", 0)
    assert row[["Atelectasis", "Effusion", "Infiltration"]].tolist() == [1, 1, 1]
    assert row[[f for f in NIH_FINDINGS if f not in ("Atelectasis", "Effusion", "Infiltration")]].sum() == 0
    assert row["No Finding"] == 0


def test_plain_and_gz_are_equivalent(nih_dir: Path, tmp_path: Path):
    gz = tmp_path / "Data_Entry_2017.csv.gz"
    gz.write_bytes(gzip.compress((nih_dir / "Data_Entry_2017.csv").read_bytes()))
    assert nih.read_data_entry(gz).table.equals(nih.read_data_entry(nih_dir / "Data_Entry_2017.csv").table)


@pytest.mark.parametrize("text,age", [("060Y", 60), ("60", 60), ("018M", 1), ("007D", 0), (" 5 ", 5), ("", None)])
def test_parse_age(text, age):
    assert nih.parse_age(text) == age


def _edit(src: Path, dst: Path, old: str, new: str) -> Path:
    text = src.read_text()
    assert old in text
    dst.write_text(text.replace(old, new, 1))
    return dst


def test_unknown_finding_names_file_line_and_label(nih_dir: Path, tmp_path: Path):
    bad = _edit(nih_dir / "Data_Entry_2017.csv", tmp_path / "Data_Entry_2017.csv",
                "Cardiomegaly|Emphysema", "Cardiomegaly|Emphysyma")
    with pytest.raises(nih.MetadataError) as err:
        nih.read_data_entry(bad)
    msg = str(err.value)
    assert str(bad) in msg and "line 3" in msg and "'Emphysyma'" in msg and "Finding Labels" in msg


def test_missing_column_is_named(nih_dir: Path, tmp_path: Path):
    bad = _edit(nih_dir / "Data_Entry_2017.csv", tmp_path / "d.csv", "View Position", "Projection")
    with pytest.raises(nih.MetadataError, match=r"line 1: missing required column\(s\) \['View Position'\]"):
        nih.read_data_entry(bad)


def test_bad_age_and_duplicates_are_errors(nih_dir: Path, tmp_path: Path):
    with pytest.raises(nih.MetadataError, match=r"line 2: column 'Patient Age': unreadable age 'x57Y'"):
        nih.read_data_entry(_edit(nih_dir / "Data_Entry_2017.csv", tmp_path / "a.csv", "057Y", "x57Y"))
    with pytest.raises(nih.MetadataError, match=r"line 3: image '00000001_000.png' is listed twice"):
        nih.read_data_entry(_edit(nih_dir / "Data_Entry_2017.csv", tmp_path / "b.csv",
                                  "00000001_001.png", "00000001_000.png"))
    with pytest.raises(nih.MetadataError, match="'No Finding' together with a finding"):
        nih.read_data_entry(_edit(nih_dir / "Data_Entry_2017.csv", tmp_path / "c.csv",
                                  "Cardiomegaly|Emphysema", "Cardiomegaly|No Finding"))


def test_not_a_csv_is_an_error(tmp_path: Path):
    bad = tmp_path / "Data_Entry_2017.csv.gz"
    bad.write_bytes(b"this is not gzip")
    with pytest.raises(nih.MetadataError, match="cannot parse"):
        nih.read_data_entry(bad)
    with pytest.raises(nih.MetadataError, match="file not found"):
        nih.read_data_entry(tmp_path / "nope.csv")


def test_bbox_and_split_lists(nih_dir: Path):
    boxes = nih.read_bbox_list(nih_dir / "BBox_List_2017.csv")
    assert len(boxes) == 5 and set(boxes["image"]) == {"00001369_000.png", "00010277_000.png"}
    assert "Infiltration" in set(boxes["finding"])  # NIH's "Infiltrate" mapped to the Data_Entry spelling
    assert np.isclose(boxes["w"].iloc[0], 553.718518518519)
    assert nih.read_split_list(nih_dir / "test_list.txt")[:2] == ["00000003_000.png", "00000003_001.png"]


def test_discovery(nih_dir: Path, tmp_path: Path):
    assert nih.find_data_entry(nih_dir).name == "Data_Entry_2017.csv"  # the 2017 name is preferred
    assert set(nih.find_split_lists(nih_dir)) == {"train_val", "test"}
    nested = tmp_path / "meta" / "deep"
    nested.mkdir(parents=True)
    (nested / "Data_Entry_2017_v2020.csv.gz").write_bytes((nih_dir / "Data_Entry_2017_v2020.csv.gz").read_bytes())
    assert nih.find_data_entry(tmp_path) == nested / "Data_Entry_2017_v2020.csv.gz"
    assert nih.find_data_entry(tmp_path / "meta" / "deep" / "..") is not None
    assert nih.find_split_lists(tmp_path) == {}


def test_full_real_data_entry(nih_sample: Path):
    entry = nih.read_data_entry(nih_sample / "Data_Entry_2017_v2020.csv.gz")
    assert len(entry) == 112_120 and entry.variant == "v2020"
    table = entry.table
    assert table["patient_id"].nunique() == 30_805
    assert set(table["view"]) == {"PA", "AP"}
    assert int(table["Pleural_Thickening"].sum()) == 3_385
    boxes = nih.read_bbox_list(nih_sample / "BBox_List_2017.csv.gz")
    assert len(boxes) == 984


def test_vectorised_ages_follow_parse_age(nih_dir: Path, tmp_path: Path):
    text = (nih_dir / "Data_Entry_2017.csv").read_text()
    for old, new in (("057Y", "018M"), ("058Y", "400D"), ("081Y", "")):
        text = text.replace(old, new, 1)
    (tmp_path / "d.csv").write_text(text)
    ages = nih.read_data_entry(tmp_path / "d.csv").table.set_index("image")["age"]
    assert ages["00000001_000.png"] == 1 and ages["00000001_001.png"] == 1
    assert ages["00000003_000.png"] is pd.NA and ages["00000100_000.png"] == 60


def test_empty_and_malformed_csv_name_the_file(nih_dir: Path, tmp_path: Path):
    empty = tmp_path / "Data_Entry_2017.csv"
    empty.write_text("")  # an interrupted download
    with pytest.raises(nih.MetadataError, match="^" + re.escape(f"{empty}: empty file")):
        nih.read_data_entry(empty)
    malformed = _edit(nih_dir / "Data_Entry_2017.csv", tmp_path / "malformed.csv", "00000100_000.png", '"00000100_000.png')
    with pytest.raises(nih.MetadataError, match="^" + re.escape(f"{malformed}: cannot parse as CSV")):
        nih.read_data_entry(malformed)
