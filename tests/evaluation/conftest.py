import gzip
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for ``evalfakes`` (tests/ has no __init__.py)

from evalfakes import FakeCache  # noqa: E402

_SHARED_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "nih-sample"
# The real sample from ../shared when it is there, else the downsampled copy shipped in sample/ (same layout).
SAMPLE = _SHARED_SAMPLE if (_SHARED_SAMPLE / "images").is_dir() else Path(__file__).resolve().parents[2] / "sample" / "nih-sample"


@pytest.fixture
def cache():
    return FakeCache()


@pytest.fixture(scope="session")
def nih_tiny_cache(tmp_path_factory):
    """A real cache: the first 64 images of the NIH sample at 32 px (real labels and official split),
    built with the project's prepare_cache."""
    if not (SAMPLE / "images").is_dir():
        pytest.skip(f"real NIH sample not found at {SAMPLE} (../shared/data is not mounted)")
    from cxrvit.data.cache import CXRCache, prepare_cache

    root = tmp_path_factory.mktemp("eval_nih")
    (root / "images").mkdir()
    names = sorted(p.name for p in (SAMPLE / "images").glob("*.png"))[:64]
    for name in names:
        os.symlink(SAMPLE / "images" / name, root / "images" / name)
    with gzip.open(SAMPLE / "Data_Entry_2017_v2020.csv.gz", "rt") as f:
        lines = f.read().splitlines()
    wanted = set(names)
    (root / "Data_Entry_2017_v2020.csv").write_text(
        "\n".join([lines[0]] + [l for l in lines[1:] if l.split(",", 1)[0] in wanted]) + "\n")
    for split in ("train_val_list.txt", "test_list.txt"):
        listed = [n for n in (SAMPLE / split).read_text().split() if n in wanted]
        (root / split).write_text("\n".join(listed) + "\n")
    out = tmp_path_factory.mktemp("eval_cache") / "cache"
    prepare_cache(root, out, 32, progress=False, workers=1, log=lambda _msg: None)
    return CXRCache(out)
