"""Finding images under a data folder and reconciling them with the metadata's listing."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pydicom
import pytest

from cxrvit.data.cache import plan_cache
from cxrvit.data.index import find_images, read_patients, reconcile, unlabelled_table


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


def test_read_patients_empty_or_malformed_csv_names_the_file(tmp_path: Path):
    empty = tmp_path / "patients.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="^" + re.escape(f"{empty}: empty file")):
        read_patients(empty)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("image,patient_id\na.png,1\nb.png,2,extra\n")
    with pytest.raises(ValueError, match="^" + re.escape(f"{ragged}: cannot parse as CSV") + ".*line 3"):
        read_patients(ragged)


def test_symlinked_folders_are_followed_once_and_loops_end(nih_dir: Path, tmp_path: Path):
    png = nih_dir / "images" / "00000001_000.png"
    elsewhere = tmp_path / "other-disk" / "images"  # e.g. images/ linked in from a bigger disk
    elsewhere.mkdir(parents=True)
    shutil.copy(png, elsewhere / "a.png")
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    shutil.copy(png, root / "sub" / "b.png")
    (root / "images").symlink_to(elsewhere, target_is_directory=True)
    (root / "sub" / "back-to-root").symlink_to(root, target_is_directory=True)  # a loop
    (root / "zz-second-link").symlink_to(elsewhere, target_is_directory=True)  # the same folder again
    (root / "cache").mkdir()
    shutil.copy(png, root / "cache" / "c.png")
    (root / "sub" / "cache-link").symlink_to(root / "cache", target_is_directory=True)
    found = find_images(root, exclude=[root / "cache"])
    # each real folder is indexed once, under the first path the sorted walk reaches it by; the excluded
    # folder stays excluded when it is reached through a link
    assert found.paths == {"a.png": "images/a.png", "b.png": "sub/b.png"}
    assert found.duplicates == {}


def _dicom_folder(folder: Path, dicom_factory) -> Path:
    """Four DICOMs of two patients (header PatientIDs), one DICOM without a PatientID, and a PNG."""
    folder.mkdir()
    for name, patient, view in (("a.dcm", "P1", "PA"), ("b.dcm", "P1", "AP"), ("c.dcm", "P2", "PA"),
                                ("d.dicom", "P2", None), ("e.dcm", "", "PA")):
        path = dicom_factory.make_dicom(folder / name, view=view)
        ds = pydicom.dcmread(path)
        ds.PatientID = patient
        ds.save_as(path)
    shutil.copy(dicom_factory.CXR64, folder / "f.png")
    return folder


def test_dicom_patient_ids_and_views_come_from_their_headers(tmp_path: Path, dicom_factory):
    folder = _dicom_folder(tmp_path / "dicoms", dicom_factory)
    table, counts = unlabelled_table(find_images(folder))
    assert dict(zip(table["image"], table["patient_id"])) == {
        "a.dcm": "P1", "b.dcm": "P1", "c.dcm": "P2", "d.dicom": "P2", "e.dcm": "e", "f.png": "f"}
    assert list(table["view"]) == ["PA", "AP", "PA", "", "", ""]
    assert counts == {"csv": 0, "dicom": 4, "stem": 2}
    # a --patients CSV still has the last word for the images it names
    patients = tmp_path / "patients.csv"
    patients.write_text("image,patient_id,view\nb,P9,LL\nf.png,P9,PA\n")
    table, counts = unlabelled_table(find_images(folder), read_patients(patients))
    assert list(table["patient_id"]) == ["P1", "P9", "P2", "P2", "e", "P9"]
    assert counts == {"csv": 2, "dicom": 3, "stem": 1}
    plan = plan_cache(folder, 16, patients=patients)
    assert any(l.endswith(f"patient IDs: 2 from {patients}, 3 from DICOM headers, 1 from file stems")
               for l in plan.report_lines)
    assert any(l.startswith(f"4 images are not named in {patients}") for l in plan.report_lines)


def test_real_dicom_folder_keeps_header_patients_together(shared_data: Path):
    folder = shared_data / "dicom"
    header_ids = {p.name: str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) for p in folder.glob("*.dcm")}
    table, counts = unlabelled_table(find_images(folder))
    assert dict(zip(table["image"], table["patient_id"])) == header_ids
    assert counts == {"csv": 0, "dicom": len(header_ids), "stem": 0}
    assert table["patient_id"].nunique() < len(table)  # several images of one patient: the leak this prevents


def test_image_files_the_walk_skips_by_name_are_reported(nih_dir: Path, tmp_path: Path, dicom_factory):
    # A PACS export names its DICOMs IM0001 or 1.2.840...: the walk looks at image extensions only, and used to
    # leave such files out without a word ("2 image files found"), while `cxrvit predict` reads them.
    root = tmp_path / "d"
    root.mkdir()
    shutil.copy(nih_dir / "images" / "00000001_000.png", root / "a.png")
    dicom_factory.make_dicom(root / "b.dcm")
    dicom_factory.make_dicom(root / "IM0001")
    dicom_factory.make_dicom(root / "scan.dic")
    (root / "notes.txt").write_text("not an image")  # not an image: not reported
    found = find_images(root)
    assert sorted(found.paths) == ["a.png", "b.dcm"]
    assert found.ignored == ["IM0001", "scan.dic"]
    lines = plan_cache(root, 16).report_lines
    assert lines[0] == f"2 image files found under {root}"
    assert lines[1].startswith("2 image files ignored, named other than ") and "IM0001, scan.dic" in lines[1]
