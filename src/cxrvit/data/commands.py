"""``cxrvit prepare`` and ``cxrvit data-summary``: thin wrappers over cache.py and summary.py."""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="decode a data folder once into a memory-mapped uint8 cache",
        description="Decode every image under --data once, pad to square, resize to --size and store uint8 "
        "pixels plus an index (labels, patients, views, official split). Resumable: re-run the same command "
        "after an interruption.",
    )
    p.add_argument("--data", required=True, help="data folder (NIH images/ or Kaggle images_0xx/images/ layout)")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--size", type=int, default=256, help="side of the stored square images (default 256)")
    p.add_argument("--csv", help="Data_Entry_2017 CSV (default: found in --data, either variant, .csv or .csv.gz)")
    p.add_argument("--unlabelled", action="store_true",
                   help="ignore NIH metadata: cache every image found, without labels (automatic when no CSV is found)")
    p.add_argument("--patients", help="unlabelled caches: CSV mapping image names to patient IDs (default: a DICOM file's "
                   "PatientID/ViewPosition header, else the file stem)")
    p.add_argument("--views", help="comma-separated views to keep, e.g. PA or PA,AP (default: all)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPU count)")
    p.add_argument("--strict", action="store_true",
                   help="fail if listed images are absent or image files are unlisted")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave unreadable images out (listed in meta.json and bad_images.txt) instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace a finished cache built from other inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)

    s = subparsers.add_parser("data-summary", help="images, patients, views and positives per split of a cache")
    s.add_argument("cache", help="cache folder written by `cxrvit prepare`")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_summary)


def _prepare(args: argparse.Namespace) -> int:
    from cxrvit.data.cache import BadImagesError, DataReportError, IncompleteCacheError, prepare_cache
    from cxrvit.data.nih import MetadataError

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731  (stdout stays clean for scripts)
    try:
        cache = prepare_cache(
            args.data, args.out, args.size, csv=args.csv, unlabelled=args.unlabelled or None,
            patients=args.patients, views=args.views.split(",") if args.views else None, workers=args.workers,
            strict=args.strict, skip_bad=args.skip_bad, overwrite=args.overwrite, progress=not args.no_progress, log=log,
        )
    except (BadImagesError, DataReportError, MetadataError, IncompleteCacheError, FileExistsError,
            FileNotFoundError, ValueError) as exc:
        print(f"cxrvit prepare: error: {exc}", file=sys.stderr)
        return 1
    print(f"cache ready: {cache.root} ({len(cache):,} images, {cache.size} px, "
          f"{'labelled' if cache.labelled else 'unlabelled'})")
    return 0


def _summary(args: argparse.Namespace) -> int:
    from cxrvit.data.cache import CXRCache, IncompleteCacheError
    from cxrvit.data.summary import format_summary, summarize

    try:
        summary = summarize(CXRCache(args.cache))
    except (IncompleteCacheError, FileNotFoundError) as exc:
        print(f"cxrvit data-summary: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
