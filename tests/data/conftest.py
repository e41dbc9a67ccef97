"""Shared fixtures for the data-layer tests: the tiny real NIH fixtures and the optional shared sample."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "nih"
SHARED = REPO.parent / "shared" / "data"
NIH_SAMPLE = SHARED / "nih-sample"


@pytest.fixture(scope="session")
def dicom_factory():
    """tests/fixtures/dicom/factory.py (``make_dicom``, ``real_pixels``, ``CXR64``): DICOMs from real CXR pixels."""
    spec = importlib.util.spec_from_file_location("dicom_factory", REPO / "tests" / "fixtures" / "dicom" / "factory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def nih_dir() -> Path:
    """The committed fixture folder (read-only: copy it before changing anything)."""
    return FIXTURES


@pytest.fixture
def nih_copy(tmp_path: Path) -> Path:
    """A writable copy of the fixture folder."""
    dst = tmp_path / "nih"
    shutil.copytree(FIXTURES, dst)
    return dst


@pytest.fixture
def nih_sample() -> Path:
    """The shared real sample (1,099 NIH PNGs, full Data_Entry); skips when the folder is absent."""
    if not NIH_SAMPLE.is_dir():
        pytest.skip(f"{NIH_SAMPLE} is absent (the shared real-data folder)")
    return NIH_SAMPLE


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (the shared real-data folder)")
    return SHARED


EMBEDDED_SAMPLE = REPO / "sample" / "nih-sample"


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """The 1,099 real sample images prepared once per session at 32 px (about 10 s on 2 cores).

    From ../shared/data/nih-sample (with NIH's full 112,120-row CSV) when present, else from the
    repository's embedded 160-px copy (its CSV is cut to the 1,099 images), else skipped.
    """
    if NIH_SAMPLE.is_dir():
        source = NIH_SAMPLE
    elif (EMBEDDED_SAMPLE / "images").is_dir():
        source = EMBEDDED_SAMPLE
    else:
        pytest.skip(f"neither {NIH_SAMPLE} nor {EMBEDDED_SAMPLE}/images is present")
    from cxrvit.data.cache import prepare_cache

    lines: list[str] = []
    cache = prepare_cache(source, tmp_path_factory.mktemp("real") / "cache", 32, workers=2,
                          progress=False, log=lines.append)
    cache.report_lines = lines  # what prepare printed, for the tests that check the report
    return cache
