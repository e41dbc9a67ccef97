"""bench/rehearsal/make_tree.py on a tiny fake NIH folder: archive counts, sorted cut, hard links, metadata."""
import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("make_tree", ROOT / "bench" / "rehearsal" / "make_tree.py")
make_tree = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_tree)

HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"


def _fake_sample(folder: Path, n_listed: int, sample_names: list[str]) -> list[str]:
    (folder / "images").mkdir(parents=True)
    for i, name in enumerate(sample_names):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(folder / "images" / name)
    names = [f"{p:08d}_000.png" for p in range(n_listed)]
    rows = "".join(f"{n},No Finding,0,{i},50,M,PA\n" for i, n in enumerate(reversed(names)))  # unsorted on purpose
    with gzip.open(folder / "Data_Entry_2017_v2020.csv.gz", "wt") as fh:
        fh.write(HEADER + rows)
    (folder / "train_val_list.txt").write_text("\n".join(names[:-5]) + "\n")
    (folder / "test_list.txt").write_text("\n".join(names[-5:]) + "\n")
    return names


def test_nih_counts_sum_to_the_dataset():
    assert make_tree.ARCHIVE_COUNTS[0] == 4999 and make_tree.ARCHIVE_COUNTS[-1] == 7121
    assert make_tree.ARCHIVE_COUNTS[1:-1] == (10_000,) * 10 and sum(make_tree.ARCHIVE_COUNTS) == 112_120
    assert make_tree.archive_counts(112_120) == list(make_tree.ARCHIVE_COUNTS)


@pytest.mark.parametrize("n", [1, 12, 50, 224])
def test_small_counts_keep_the_proportions(n):
    counts = make_tree.archive_counts(n)
    assert len(counts) == 12 and sum(counts) == n and min(counts) >= 0


def test_tree_layout_links_and_metadata(tmp_path):
    sample, out = tmp_path / "sample", tmp_path / "tree"
    # two sample images carry listed names (they link to themselves), one does not
    names = _fake_sample(sample, 224, ["00000003_000.png", "00000100_000.png", "zz_unlisted.png"])
    report = make_tree.build_tree(sample, out)
    counts = make_tree.archive_counts(224)
    assert report["names"] == 224 and report["archives"] == counts
    assert report["own_image"] == 2 and report["cycled"] == 222

    listed = []
    for i, count in enumerate(counts, start=1):
        folder = out / f"images_{i:03d}" / "images"
        files = sorted(os.listdir(folder))
        assert len(files) == count
        listed += files
    assert listed == names                      # every name once, archives cut from the sorted names
    assert sorted(os.listdir(out / "images_001" / "images"))[0] == names[0]

    own = {p.name: p.stat().st_ino for p in (out / ".sample").iterdir()}
    inodes = {(out / f"images_{i:03d}" / "images" / n).stat().st_ino for i in range(1, 13)
              for n in os.listdir(out / f"images_{i:03d}" / "images")}
    assert inodes <= set(own.values())          # hard links to our copies ...
    assert inodes.isdisjoint(p.stat().st_ino for p in (sample / "images").iterdir())  # ... never the originals
    linked = next(out.glob("images_*/images/00000100_000.png"))
    assert linked.stat().st_ino == own["00000100_000.png"]   # a sample name links to its own image
    assert (out / ".sample" / "zz_unlisted.png").stat().st_nlink > 1   # the unlisted one is cycled in

    for meta in ("Data_Entry_2017_v2020.csv.gz", "train_val_list.txt", "test_list.txt"):
        assert (out / meta).read_bytes() == (sample / meta).read_bytes()


def test_prepare_finds_the_tree(tmp_path):
    """cxrvit's own index finds every listed image in the Kaggle layout and none of the hidden copies."""
    from cxrvit.data.index import find_images, reconcile

    sample, out = tmp_path / "sample", tmp_path / "tree"
    names = _fake_sample(sample, 50, ["00000001_000.png"])
    make_tree.build_tree(sample, out)
    found = find_images(out)
    report = reconcile(names, found)
    assert report.complete and len(report.present) == 50
    assert not any(p.startswith(".sample") for p in found.paths.values())


def test_refuses_an_existing_tree(tmp_path):
    sample, out = tmp_path / "sample", tmp_path / "tree"
    _fake_sample(sample, 12, ["00000001_000.png"])
    out.mkdir()
    with pytest.raises(FileExistsError):
        make_tree.build_tree(sample, out)
