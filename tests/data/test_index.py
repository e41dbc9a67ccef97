"""Finding images under a data folder and reconciling them with the metadata's listing."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cxrvit.data.index import find_images, read_patients, reconcile


def test_find_images_any_layout_sorted_and_reported(nih_dir: Path, tmp_path: Path):
    root = tmp_path / "d"
    png = nih_dir / "images" / "00000001_000.png"
    for rel in ("images_002/images/b.png", "images_001/images/a.png", "x/deep/er/c.PNG", "images/a.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, root / rel)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    shutil.copy(png, root / ".hidden" / "h.png")
    (root / "cache").mkdir()
    shutil.copy(png, root / "cache" / "z.png")
    found = find_images(root, exclude=[root / "cache"])
    assert found.paths == {"a.png": "images/a.png", "b.png": "images_002/images/b.png", "c.PNG": "x/deep/er/c.PNG"}
    assert found.duplicates == {"a.png": ["images/a.png", "images_001/images/a.png"]}
    report = reconcile(["a.png", "b.png", "gone.png"], found)
    assert (report.present, report.listed_absent, report.unlisted_present) == (["a.png", "b.png"], ["gone.png"], ["c.PNG"])
    text = "\n".join(report.lines())
    assert "1 listed images are absent" in text and "gone.png" in text and "c.PNG" in text
    assert "a.png: images/a.png, images_001/images/a.png" in text
    assert not report.complete and report.to_meta()["listed_absent"] == 1
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        find_images(tmp_path / "missing")


def test_read_patients_errors(tmp_path: Path):
    bad = tmp_path / "p.csv"
    bad.write_text("name,who\na,b\n")
    with pytest.raises(ValueError, match=r"p.csv: needs an image column"):
        read_patients(bad)
    bad.write_text("image,patient_id\na.png,1\na.png,2\n")
    with pytest.raises(ValueError, match=r"line 3: image 'a.png' listed twice"):
        read_patients(bad)
