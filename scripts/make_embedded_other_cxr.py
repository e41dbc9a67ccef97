"""Rebuild sample/other-cxr/hannover: the 243 Hannover radiographs, downsampled so that a clone carries them.

Usage: python scripts/make_embedded_other_cxr.py [SRC] [--long-side 192]
SRC defaults to ../shared/data/other-cxr/hannover. These non-NIH images (CC BY 3.0, Hannover Medical
School) are the extra unlabelled images of the main job's self-supervised pre-training stage. The
aspect ratio is kept (they are not square); `cxrvit prepare` makes them square the same way it does
any other folder of images.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", default=str(ROOT.parent / "shared/data/other-cxr/hannover"))
    ap.add_argument("--long-side", type=int, default=192)
    ap.add_argument("--out", default=str(ROOT / "sample/other-cxr/hannover"))
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "png").mkdir(parents=True)
    names = sorted(p.name for p in (src / "png").glob("*.png"))
    for name in names:
        with Image.open(src / "png" / name) as im:
            im = im.convert("L")
            scale = args.long_side / max(im.size)
            small = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
            small.save(out / "png" / name, optimize=True)
    for fname in ("LICENSE", "README-source.md", "data.csv"):
        shutil.copy(src / fname, out / fname)
    print(f"wrote {len(names)} images (long side {args.long_side} px) to {out}")


if __name__ == "__main__":
    main()
