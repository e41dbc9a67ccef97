"""Build a full-size NIH ChestX-ray14 folder out of the 1,099 real sample images, in seconds.

The rehearsal (issue 22) needs every one of the 112,120 names that NIH's Data_Entry CSV lists,
laid out as Kaggle's mirror ships them (``images_001/images/`` ... ``images_012/images/``), so
that ``cxrvit prepare``, the official split, the loader and the evaluation run at full scale
on a machine that only has the sample. Each name is a *hard link* to a real sample image: the
tree costs ~100 MB of disk and no time to write, and every file is a real PNG a decoder must
really decode. Names that are in the sample link to their own image (their labels are then
their real ones); the others cycle through the sample in sorted order.

NIH cut its twelve archives from the sorted file names: 4,999 in the first, 10,000 in each of
the next ten, 7,121 in the last. ``ARCHIVE_COUNTS`` keeps those counts; a CSV of another length
(the tiny fake one in the tests) is cut in the same proportions.

The sample images are first copied into ``OUT/.sample/`` (a hidden folder, which ``prepare``'s
walk skips) and the links point at those copies, never at the read-only shared data: writing
through a link would otherwise write into the shared folder, and linking there changes its inodes.

    python bench/rehearsal/make_tree.py [--sample /work/shared/data/nih-sample] [--out /work/rehearsal/nih]
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import time
from pathlib import Path

#: Images per NIH archive, images_001 ... images_012 (NIH's batch_download_zips.py / Kaggle).
ARCHIVE_COUNTS = (4999,) + (10000,) * 10 + (7121,)
assert sum(ARCHIVE_COUNTS) == 112_120

METADATA_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv", "BBox_List_2017.csv",
                  "train_val_list.txt", "test_list.txt")


def read_listed_names(csv_path: Path) -> list[str]:
    """The ``Image Index`` column, sorted: only the first field is needed, so no pandas."""
    opener = gzip.open if csv_path.suffix == ".gz" else open
    with opener(csv_path, "rt", newline="") as fh:
        header = fh.readline().split(",")
        if header[0].strip() != "Image Index":
            raise ValueError(f"{csv_path}: first column is {header[0]!r}, expected 'Image Index'")
        return sorted(line.split(",", 1)[0] for line in fh if line.strip())


def archive_counts(n: int) -> list[int]:
    """NIH's per-archive counts for n == 112,120; otherwise the same proportions, summing to n."""
    if n == sum(ARCHIVE_COUNTS):
        return list(ARCHIVE_COUNTS)
    total = sum(ARCHIVE_COUNTS)
    edges = [round(n * sum(ARCHIVE_COUNTS[: i + 1]) / total) for i in range(len(ARCHIVE_COUNTS))]
    return [b - a for a, b in zip([0] + edges[:-1], edges)]


def find_metadata(sample: Path) -> list[Path]:
    """The sample's metadata files, plain or gzipped, copied under the same names."""
    return [p for name in METADATA_FILES for p in (sample / name, sample / (name + ".gz")) if p.is_file()]


def build_tree(sample: Path, out: Path) -> dict:
    """Create ``out`` (which must not exist yet) and return counts for the report."""
    images = sorted((sample / "images").glob("*.png"))
    if not images:
        raise FileNotFoundError(f"{sample}/images: no PNG files")
    csv = next((p for p in find_metadata(sample) if p.name.startswith("Data_Entry")), None)
    if csv is None:
        raise FileNotFoundError(f"{sample}: no Data_Entry_2017 CSV")
    if out.exists():
        raise FileExistsError(f"{out}: exists; remove it first (the tree is rebuilt, never patched)")
    names = read_listed_names(csv)
    if len(set(names)) != len(names):
        raise ValueError(f"{csv}: image names are not unique")

    out.mkdir(parents=True)
    own = out / ".sample"
    own.mkdir()
    sources = []
    for img in images:  # our own copies: the links must not share inodes with the shared data
        shutil.copy2(img, own / img.name)
        sources.append(own / img.name)
    by_name = {p.name: p for p in sources}
    for meta in find_metadata(sample):
        shutil.copy2(meta, out / meta.name)

    counts = archive_counts(len(names))
    start = 0
    cycled = 0
    for archive, count in enumerate(counts, start=1):
        folder = out / f"images_{archive:03d}" / "images"
        folder.mkdir(parents=True)
        for name in names[start : start + count]:  # contiguous blocks of the sorted names
            src = by_name.get(name)
            if src is None:
                src = sources[cycled % len(sources)]
                cycled += 1
            os.link(src, folder / name)
        start += count
    return {"names": len(names), "archives": counts, "own_image": len(names) - cycled, "cycled": cycled,
            "sample_images": len(sources)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sample", type=Path, default=Path("/work/shared/data/nih-sample"))
    ap.add_argument("--out", type=Path, default=Path("/work/rehearsal/nih"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    report = build_tree(args.sample, args.out)
    print(f"{args.out}: {report['names']:,} names in {len(report['archives'])} archives "
          f"({', '.join(f'{c:,}' for c in report['archives'])}); {report['own_image']:,} link to their own image, "
          f"{report['cycled']:,} cycle through {report['sample_images']:,} sample images; "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
