"""Rebuild sample/nih-sample: the real NIH sample downsampled so that a clone carries it (<= 20 MB).

Usage: python scripts/make_embedded_sample.py [SRC] [--size 160]
SRC defaults to ../shared/data/nih-sample. Images are resized with antialiased bilinear filtering
(all sample images are square, so no padding is involved); the 7 RGBA originals stay RGBA so the
RGBA -> grey path is exercised. Metadata files are cut to the rows of the images present.
"""
from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", default=str(ROOT.parent / "shared/data/nih-sample"))
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--out", default=str(ROOT / "sample/nih-sample"))
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    names = sorted(p.name for p in (src / "images").glob("*.png"))
    for name in names:
        with Image.open(src / "images" / name) as im:
            im.load()
            small = im.resize((args.size, args.size), Image.BILINEAR)
            small.save(out / "images" / name, optimize=True)
    keep = set(names)

    def cut_csv(fname: str) -> None:
        with gzip.open(src / fname, "rt") as fh, gzip.open(out / fname, "wt") as dst:
            header = fh.readline()
            dst.write(header)
            for line in fh:
                if line.split(",", 1)[0] in keep:
                    dst.write(line)

    cut_csv("Data_Entry_2017_v2020.csv.gz")
    cut_csv("BBox_List_2017.csv.gz")
    for fname in ("train_val_list.txt", "test_list.txt"):
        listed = [n for n in (src / fname).read_text().split() if n in keep]
        (out / fname).write_text("\n".join(listed) + "\n")
    shutil.copy(src / "SOURCES.csv", out / "SOURCES.csv")
    print(f"wrote {len(names)} images at {args.size} px to {out}")


if __name__ == "__main__":
    main()
