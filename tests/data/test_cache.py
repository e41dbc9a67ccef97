"""prepare_cache / CXRCache: contents, data reports, bad images, resumability, unlabelled folders."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrvit.data import cache as cache_mod
from cxrvit.data import images as images_mod
from cxrvit.data import resume as resume_mod
from cxrvit.data.cache import (BadImagesError, CXRCache, DataReportError, IncompleteCacheError, prepare_cache)
from cxrvit.data.images import load_square

REPO = Path(__file__).resolve().parents[2]
SIZE = 32


def _prep(data, out, **kw) -> CXRCache:
    kw.setdefault("workers", 1)
    return prepare_cache(data, out, SIZE, progress=False, log=lambda *_: None, **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_fixture_cache_contents(nih_dir: Path, tmp_path: Path):
    cache = _prep(nih_dir, tmp_path / "c")
    assert len(cache) == 12 and cache.size == SIZE and cache.labelled
    assert cache.pixels.shape == (12, SIZE, SIZE) and cache.pixels.dtype == np.uint8
    assert list(cache.index["image"]) == sorted(p.name for p in (nih_dir / "images").glob("*.png"))
    # each row holds exactly the pixels of its own image, through the one geometry rule
    for row in (0, 3, 11):
        expected = load_square(nih_dir / cache.index["path"][row], SIZE)
        assert np.array_equal(cache.pixels[row], expected)
    counts = cache.labels(["Atelectasis", "Effusion", "Mass", "Nodule", "Mass/Nodule", "No Finding"]).sum(0)
    assert counts.tolist() == [2, 5, 2, 2, 3, 2]
    assert cache.index["official_split"].value_counts().to_dict() == {"train_val": 7, "test": 5}
    assert cache.meta["listed_absent"] == 3 and cache.meta["unlisted_present"] == 0
    assert cache.meta["csv_variant"] == "2017" and cache.meta["bad_images"] == []
    assert set(cache.patient_ids) == {"1", "100", "211", "404", "1362", "1369", "2061", "10277"}
    cache.verify()  # the checksums in COMPLETE match


def test_rgb_rgba_16bit_and_non_square_become_the_same_grey(nih_copy: Path, tmp_path: Path):
    rgba = nih_copy / "images" / "00000100_000.png"
    assert Image.open(rgba).mode == "RGBA"
    grey = np.asarray(Image.open(rgba).convert("L"))
    # a 16-bit copy of a grey image: min-max scaling must give back the same 8-bit picture
    src = np.asarray(Image.open(nih_copy / "images" / "00000001_000.png"))
    wide = (src.astype(np.uint16) - src.min()) * 257
    Image.fromarray(wide.astype(np.uint16)).save(nih_copy / "images" / "00000001_000.png")
    assert Image.open(nih_copy / "images" / "00000001_000.png").mode.startswith("I")
    # a non-square crop: padded to square with its minimum, then resized
    tall = np.asarray(Image.open(nih_copy / "images" / "00000211_000.png"))[:, 12:52]
    Image.fromarray(tall).save(nih_copy / "images" / "00000211_000.png")
    # an RGB copy of a grey image (equal channels) must give the grey image back
    grey_l = np.asarray(Image.open(nih_copy / "images" / "00001362_001.png"))
    Image.fromarray(np.stack([grey_l] * 3, axis=-1)).save(nih_copy / "images" / "00001362_001.png")
    assert Image.open(nih_copy / "images" / "00001362_001.png").mode == "RGB"
    cache = _prep(nih_copy, tmp_path / "c")
    rows = {name: i for i, name in enumerate(cache.index["image"])}
    assert np.array_equal(cache.pixels[rows["00001362_001.png"]],
                          np.asarray(Image.fromarray(grey_l).resize((SIZE, SIZE), Image.BILINEAR, reducing_gap=None)))
    assert np.array_equal(cache.pixels[rows["00000100_000.png"]],
                          np.asarray(Image.fromarray(grey).resize((SIZE, SIZE), Image.BILINEAR, reducing_gap=None)))
    stretched = ((src.astype(np.float32) - src.min()) * 255.0 / (src.max() - src.min()) + 0.5).astype(np.uint8)
    assert np.abs(cache.pixels[rows["00000001_000.png"]].astype(int)
                  - np.asarray(Image.fromarray(stretched).resize((SIZE, SIZE), Image.BILINEAR, reducing_gap=None))
                  ).max() <= 1
    padded = cache.pixels[rows["00000211_000.png"]]
    assert (padded[:, :3] == tall.min()).all() and (padded[:, -3:] == tall.min()).all()


def test_kaggle_layout_gives_the_same_cache(nih_dir: Path, tmp_path: Path):
    kaggle = tmp_path / "kaggle"
    names = sorted(p.name for p in (nih_dir / "images").glob("*.png"))
    for i, name in enumerate(names):
        folder = kaggle / f"images_{1 + i % 2:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(nih_dir / "images" / name, folder / name)
    shutil.copy(nih_dir / "Data_Entry_2017_v2020.csv.gz", kaggle)
    a, b = _prep(nih_dir, tmp_path / "a"), _prep(kaggle, tmp_path / "b")
    assert np.array_equal(a.pixels, b.pixels)
    assert b.index["path"][1] == "images_002/images/00000001_001.png"
    cols = [c for c in a.index.columns if c not in ("path", "official_split")]
    assert a.index[cols].equals(b.index[cols])
    assert (b.index["official_split"] == "").all()  # no split lists in this folder: said, not invented


def test_unlisted_images_are_reported_and_strict_refuses(nih_copy: Path, tmp_path: Path):
    shutil.copy(nih_copy / "images" / "00000001_000.png", nih_copy / "images" / "99999999_000.png")
    lines: list[str] = []
    cache = prepare_cache(nih_copy, tmp_path / "c", SIZE, workers=1, progress=False, log=lines.append)
    assert len(cache) == 12 and cache.meta["unlisted_present"] == 1
    assert any("1 image files are not in the metadata" in l and "99999999_000.png" in l for l in lines)
    assert any("3 listed images are absent" in l for l in lines)
    with pytest.raises(DataReportError, match="3 listed images are absent"):
        _prep(nih_copy, tmp_path / "d", strict=True)
    inside = _prep(nih_copy, nih_copy / "cache")  # a cache written inside the data folder is not data
    assert inside.meta["unlisted_present"] == 1 and len(inside) == 12
    again = _prep(nih_copy, nih_copy / "cache")
    assert again.meta == inside.meta


def test_views_filter(nih_dir: Path, tmp_path: Path):
    cache = _prep(nih_dir, tmp_path / "c", views=["pa"])
    assert len(cache) == 8 and set(cache.index["view"]) == {"PA"} and cache.meta["views_filter"] == ["PA"]
    with pytest.raises(ValueError, match="no images to cache.*keeping LL"):
        _prep(nih_dir, tmp_path / "e", views=["LL"])


def test_corrupt_png_is_named_and_skip_bad_keeps_going(nih_copy: Path, tmp_path: Path):
    victim = nih_copy / "images" / "00000404_000.png"
    victim.write_bytes(victim.read_bytes()[:300])  # truncated mid-stream
    (nih_copy / "images" / "00001362_004.png").write_bytes(b"GIF89a not a chest x-ray")
    with pytest.raises(BadImagesError) as err:
        _prep(nih_copy, tmp_path / "c")
    msg = str(err.value)
    assert "2 image(s) could not be read" in msg and "00000404_000.png: png decode failed" in msg
    assert "00001362_004.png: not a PNG, JPEG or DICOM file" in msg
    with pytest.raises(IncompleteCacheError):
        CXRCache(tmp_path / "c")
    # the same run with --skip-bad resumes and finishes without the two files, and says so
    cache = _prep(nih_copy, tmp_path / "c", skip_bad=True)
    assert len(cache) == 10 and "00000404_000.png" not in set(cache.index["image"])
    assert [Path(b["path"]).name for b in cache.meta["bad_images"]] == ["00000404_000.png", "00001362_004.png"]
    assert "00000404_000.png" in (tmp_path / "c" / "bad_images.txt").read_text()
    clean = _prep(nih_copy.parent / "nih", tmp_path / "x", skip_bad=True)  # same inputs, one go
    assert _files(tmp_path / "c") == _files(tmp_path / "x")
    row = list(cache.index["image"]).index("00001369_000.png")
    assert np.array_equal(cache.pixels[row], load_square(nih_copy / "images" / "00001369_000.png", SIZE))


def test_rerun_is_a_no_op_and_other_inputs_need_overwrite(nih_dir: Path, tmp_path: Path):
    _prep(nih_dir, tmp_path / "c")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()}
    _prep(nih_dir, tmp_path / "c")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()} == before
    with pytest.raises(FileExistsError, match="--overwrite"):
        _prep(nih_dir, tmp_path / "c", views=["AP"])
    assert len(_prep(nih_dir, tmp_path / "c", views=["AP"], overwrite=True)) == 4


def test_crash_during_finalize_resumes_identically(nih_dir: Path, tmp_path: Path, monkeypatch):
    reference = _files(_prep(nih_dir, tmp_path / "ref").root)
    real = cache_mod.sha256_file

    def crash(path, *a, **k):  # dies after pixels/index/meta are in place, before COMPLETE
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(cache_mod, "sha256_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _prep(nih_dir, tmp_path / "c")
    assert not (tmp_path / "c" / "COMPLETE").exists() and (tmp_path / "c" / "pixels.u8").exists()
    with pytest.raises(IncompleteCacheError, match="COMPLETE is missing"):
        CXRCache(tmp_path / "c")
    monkeypatch.setattr(cache_mod, "sha256_file", real)
    assert _files(_prep(nih_dir, tmp_path / "c").root) == reference


def test_corrupted_cache_fails_verification(nih_dir: Path, tmp_path: Path):
    cache = _prep(nih_dir, tmp_path / "c")
    del cache
    with open(tmp_path / "c" / "pixels.u8", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x07")
    CXRCache(tmp_path / "c")  # opening is cheap and does not hash
    with pytest.raises(IncompleteCacheError, match="checksum differs"):
        CXRCache(tmp_path / "c", verify=True)


#: ``cxrvit prepare`` with every decode 0.4 s slower, so the test can kill it reliably half-way. The slow-down is
#: patched in here, in the child process (pool workers are forked from it and inherit it), not read by the library.
SLOW_PREPARE = """
import sys, time
from cxrvit.data import images
from cxrvit.cli import main
_load = images.load_square
def slow_load(path, size):
    time.sleep(0.4)
    return _load(path, size)
images.load_square = slow_load
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_prepare_resumes_to_an_identical_cache(nih_dir: Path, tmp_path: Path, workers: int):
    reference = _files(_prep(nih_dir, tmp_path / "ref").root)
    out = tmp_path / "c"
    cmd = [sys.executable, "-c", SLOW_PREPARE, "prepare", "--data", str(nih_dir), "--out", str(out),
           "--size", str(SIZE), "--workers", str(workers), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    progress = out / ".partial" / "progress.bits"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until some, not all, images are recorded as done
        assert not (out / "COMPLETE").exists(), "prepare finished before it could be killed"
        if progress.exists():
            done = np.unpackbits(np.frombuffer(progress.read_bytes(), np.uint8), count=12).sum()
            if 1 <= done <= 10:
                break
        time.sleep(0.05)
    else:
        pytest.fail("prepare never reached the middle")
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: no orphaned pool workers
    proc.wait()
    assert not (out / "COMPLETE").exists()
    with pytest.raises(IncompleteCacheError):
        CXRCache(out)
    lines: list[str] = []
    cache = prepare_cache(nih_dir, out, SIZE, workers=workers, progress=False, log=lines.append)
    assert any(l.startswith("resuming:") for l in lines)
    assert _files(cache.root) == reference and not (out / ".partial").exists()


def test_unlabelled_folder_with_patients_csv(nih_dir: Path, tmp_path: Path):
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in ("00000001_000.png", "00000001_001.png", "00000100_000.png"):
        shutil.copy(nih_dir / "images" / name, folder / name)
    lines: list[str] = []
    cache = prepare_cache(folder, tmp_path / "u", SIZE, workers=1, progress=False, log=lines.append)
    assert not cache.labelled and len(cache) == 3
    assert any("unlabelled cache: no Data_Entry_2017 CSV was found" in l for l in lines)
    assert list(cache.patient_ids) == ["00000001_000", "00000001_001", "00000100_000"]
    assert not any(c in cache.index.columns for c in ("Atelectasis", "No Finding"))
    with pytest.raises(ValueError, match="unlabelled cache has no labels"):
        cache.labels(["Atelectasis"])
    from cxrvit.data.summary import format_summary, summarize

    summary = summarize(cache)
    assert (summary["images"], summary["patients"], summary["labelled"]) == (3, 3, False)
    assert "positives" not in summary and summary["splits"]["unassigned"]["images"] == 3
    assert "unlabelled" in format_summary(summary)
    patients = tmp_path / "patients.csv"
    patients.write_text("image_id,patient_id,projection\n00000001_000,p1,pa\n00000001_001.png,p1,ap\n")
    lines.clear()
    cache = prepare_cache(folder, tmp_path / "u2", SIZE, patients=patients, workers=1, progress=False, log=lines.append)
    assert list(cache.patient_ids) == ["p1", "p1", "00000100_000"]
    assert any(l.startswith("1 images are not named in") for l in lines)
    assert list(cache.index["view"]) == ["PA", "AP", ""]
    forced = _prep(nih_dir, tmp_path / "u3", unlabelled=True)  # --unlabelled ignores the CSV it would find
    assert not forced.labelled and len(forced) == 12


def test_real_hannover_non_square_folder(shared_data: Path, tmp_path: Path):
    hannover = shared_data / "other-cxr" / "hannover"
    cache = _prep(hannover / "png", tmp_path / "h", patients=hannover / "data.csv", workers=2)
    assert len(cache) == 243 and not cache.labelled
    assert cache.index["patient_id"].nunique() == 71
    assert cache.index["view"].value_counts().to_dict() == {"AP": 194, "PA": 49}


def test_dicom_files_go_through_read_grey(shared_data: Path, tmp_path: Path):
    pytest.importorskip("cxrvit.data.dicom")
    cache = _prep(shared_data / "dicom", tmp_path / "d")
    n = len(list((shared_data / "dicom").glob("*.dcm")))
    assert n >= 5 and len(cache) == n and cache.meta["bad_images"] == []
    assert all(name.endswith(".dcm") for name in cache.index["image"])
    assert cache.pixels.reshape(n, -1).std(1).min() > 10  # real pictures, not blank rows


# -- carrying decoded rows over to new inputs (cxrvit.data.resume) ---------------------------------

def _count_decodes(monkeypatch) -> list[str]:
    """Record the file name of every image decoded from here on (with workers=1 they decode in this process)."""
    decoded: list[str] = []
    real = images_mod.load_square

    def counting(path, size):
        decoded.append(Path(path).name)
        return real(path, size)

    monkeypatch.setattr(images_mod, "load_square", counting)
    return decoded


def _vouched_rows(work: Path, data: Path) -> int:
    """The crash-safety invariant of a work folder: every row its bitmap marks done holds exactly its image's
    pixels. Returns how many rows are marked done."""
    paths = pd.read_csv(work / "plan.csv", dtype=str, keep_default_na=False)["path"].tolist()
    done = resume_mod.load_progress(work, len(paths))
    if done.any():
        pixels = np.fromfile(work / "pixels.u8", np.uint8).reshape(len(paths), SIZE, SIZE)
        for row in np.flatnonzero(done):
            assert np.array_equal(pixels[row], load_square(data / paths[row], SIZE)), paths[row]
    return int(done.sum())


def _fail_on_one_bad_image(data: Path, out: Path) -> Path:
    """A first run that stops on one truncated image, after decoding all the others into out/.partial."""
    victim = data / "images" / "00000404_000.png"
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(BadImagesError, match="fix or remove them and re-run to resume"):
        _prep(data, out)
    return victim


def _boom(*args, **kwargs):
    raise KeyboardInterrupt("simulated crash")


def test_removing_a_bad_image_keeps_the_decoded_ones(nih_copy: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "c"
    victim = _fail_on_one_bad_image(nih_copy, out)
    good = len(list((nih_copy / "images").glob("*.png"))) - 1
    assert _vouched_rows(out / ".partial", nih_copy) == good
    victim.unlink()  # as the message advises: the plan (and its key) changes
    decoded = _count_decodes(monkeypatch)
    lines: list[str] = []
    cache = prepare_cache(nih_copy, out, SIZE, workers=1, progress=False, log=lines.append)
    assert decoded == []  # every image still planned was carried over, none decoded again
    assert f"resuming: carried over {good} finished image(s) from an unfinished run made with other inputs" in lines
    assert not any("discarding" in line for line in lines)
    assert sorted(p.name for p in out.iterdir()) == ["COMPLETE", "index.csv", "meta.json", "pixels.u8"]
    monkeypatch.undo()
    assert _files(cache.root) == _files(_prep(nih_copy, tmp_path / "fresh").root)


@pytest.mark.parametrize("crash_in", ["carry_rows", "drop_aside", "decode_rows"])
def test_carry_over_survives_a_crash_at_each_step(nih_copy: Path, tmp_path: Path, monkeypatch, crash_in: str):
    out = tmp_path / "c"
    victim = _fail_on_one_bad_image(nih_copy, out)
    good = len(list((nih_copy / "images").glob("*.png"))) - 1
    victim.unlink()
    added = nih_copy / "images" / "00000003_000.png"  # listed, absent so far: the new plan has a row to decode
    shutil.copy(nih_copy / "images" / "00000001_000.png", added)
    monkeypatch.setattr(resume_mod, crash_in, _boom)
    with pytest.raises(KeyboardInterrupt):
        _prep(nih_copy, out)
    monkeypatch.undo()
    assert not (out / "COMPLETE").exists()
    vouched = _vouched_rows(out / ".partial", nih_copy)
    if crash_in == "decode_rows":  # the carried rows are safe in the new work, the old one is gone
        assert vouched == good and not (out / ".partial-previous").exists()
    else:  # the old work is set aside, intact, until the carried rows are safe
        assert _vouched_rows(out / ".partial-previous", nih_copy) == good
    decoded = _count_decodes(monkeypatch)
    cache = _prep(nih_copy, out)
    assert decoded == [added.name]  # only the new image: nothing carried was lost or decoded twice
    monkeypatch.undo()
    assert _files(cache.root) == _files(_prep(nih_copy, tmp_path / "fresh").root)
    assert not {".partial", ".partial-previous", ".partial-trash"} & {p.name for p in out.iterdir()}


def test_unfinished_run_of_another_size_is_discarded(nih_copy: Path, tmp_path: Path):
    out = tmp_path / "c"
    _fail_on_one_bad_image(nih_copy, out)
    lines: list[str] = []
    with pytest.raises(BadImagesError):
        prepare_cache(nih_copy, out, SIZE // 2, workers=1, progress=False, log=lines.append)
    assert any("discarding an unfinished run made with other inputs" in line for line in lines)


# -- a finished --skip-bad cache whose left-out images are repaired ----------------------------------

def _skip_bad_cache(data: Path, out: Path) -> tuple[Path, bytes]:
    victim = data / "images" / "00000404_000.png"
    original = victim.read_bytes()
    victim.write_bytes(original[:300])
    assert len(_prep(data, out, skip_bad=True)) == len(list((data / "images").glob("*.png"))) - 1
    return victim, original


def test_skip_bad_cache_is_rebuilt_once_a_left_out_image_is_repaired(nih_copy: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "c"
    victim, original = _skip_bad_cache(nih_copy, out)
    n = len(CXRCache(out))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # not repaired yet: --skip-bad accepts the cache and says what it lacks; without --skip-bad the run fails
    lines: list[str] = []
    assert len(prepare_cache(nih_copy, out, SIZE, skip_bad=True, workers=1, progress=False, log=lines.append)) == n
    assert lines[-1] == (f"{out}: already complete with these inputs; nothing to do (1 unreadable image(s) left out, "
                         f"listed in {out / 'bad_images.txt'}: re-run after fixing them to add them)")
    with pytest.raises(BadImagesError, match=r"00000404_000.png: png decode failed[\s\S]*stays usable"):
        _prep(nih_copy, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched, and still usable:
    assert len(CXRCache(out, verify=True)) == n
    # repaired: only that image is decoded (checked, then cached); every other row is carried over
    victim.write_bytes(original)
    decoded = _count_decodes(monkeypatch)
    lines.clear()
    cache = prepare_cache(nih_copy, out, SIZE, workers=1, progress=False, log=lines.append)
    assert set(decoded) == {victim.name}
    assert f"resuming: carried over {n} finished image(s) from the finished cache" in lines
    assert len(cache) == n + 1 and cache.meta["bad_images"] == [] and not (out / "bad_images.txt").exists()
    monkeypatch.undo()
    assert _files(out) == _files(_prep(nih_copy, tmp_path / "fresh").root)


@pytest.mark.parametrize("crash_in", ["carry_rows", "decode_rows"])
def test_rebuild_of_a_skip_bad_cache_survives_a_crash(nih_copy: Path, tmp_path: Path, monkeypatch, crash_in: str):
    out = tmp_path / "c"
    victim, original = _skip_bad_cache(nih_copy, out)
    n = len(CXRCache(out))
    victim.write_bytes(original)
    monkeypatch.setattr(resume_mod, crash_in, _boom)
    with pytest.raises(KeyboardInterrupt):
        _prep(nih_copy, out, skip_bad=True)
    monkeypatch.undo()
    if crash_in == "carry_rows":  # before the rows are safe in the work, the finished cache stays complete
        assert len(CXRCache(out, verify=True)) == n
    else:  # after: it no longer claims to be complete, and the work vouches for the carried rows
        assert not (out / "COMPLETE").exists() and _vouched_rows(out / ".partial", nih_copy) == n
    decoded = _count_decodes(monkeypatch)
    cache = _prep(nih_copy, out, skip_bad=True)
    assert set(decoded) == {victim.name} and len(cache) == n + 1
    monkeypatch.undo()
    assert _files(out) == _files(_prep(nih_copy, tmp_path / "fresh").root)
