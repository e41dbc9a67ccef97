"""The prepared cache: every image decoded once, squared, resized and stored as raw uint8.

Training reads a 256-px chest X-ray thousands of times; decoding a 1024-px PNG costs ~10 ms,
reading 64 KiB from a memory-mapped file costs microseconds. Layout (docs/architecture.md)::

    CACHE/pixels.u8    uint8 [N, S, S], C order
    CACHE/index.csv    row i describes pixels[i]
    CACHE/meta.json    size, n, labelled, source, data report, bad images, ...
    CACHE/COMPLETE     written last, holds sha256 checksums of the three files above

While ``prepare`` runs, work lives in ``CACHE/.partial/`` (pixels of every candidate image, a
done-bitmap flushed every second, and the plan it is executing). A run killed at any moment
leaves no COMPLETE marker, so the cache refuses to open; a re-run with the same inputs picks
the bitmap up and finishes with a byte-identical cache (nothing in it depends on timing). A re-run
with other inputs (a bad image removed) or a finished ``--skip-bad`` cache whose left-out images
were repaired keeps every decoded row still planned (:mod:`cxrvit.data.resume`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from cxrvit.data import index as index_mod
from cxrvit.data import nih
from cxrvit.data import resume
from cxrvit.fileio import atomic_write
from cxrvit.labels import label_matrix

FORMAT = "cxrvit-cache/1"
GEOMETRY = "pad-to-square-with-image-minimum, then bilinear resize (cxrvit.data.images.square_resize)"
INDEX, META, COMPLETE, BAD_LIST = "index.csv", "meta.json", "COMPLETE", "bad_images.txt"
PIXELS, WORK = resume.PIXELS, resume.WORK
_STR_COLUMNS = ("image", "patient_id", "view", "sex", "official_split", "path")


class IncompleteCacheError(RuntimeError):
    """The folder is not a finished cache (no COMPLETE marker, or files that do not match it)."""


class DataReportError(RuntimeError):
    """``--strict``: the images on disk do not match the metadata's listing."""


class BadImagesError(RuntimeError):
    """Some images could not be decoded; the message lists each file and the reason."""

    def __init__(self, bad: list[tuple[str, str]], hint: str = ""):
        self.bad = bad
        shown = "\n".join(f"  {path}: {reason}" for path, reason in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        super().__init__(f"{len(bad)} image(s) could not be read:\n{shown}{more}{hint}")


# ---------------------------------------------------------------------------------------------
# Reading a finished cache


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_index_csv(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, dtype={c: str for c in _STR_COLUMNS}, keep_default_na=False)
    for col in ("age", "follow_up"):
        table[col] = pd.to_numeric(table[col].replace("", None), errors="raise").astype("Int64")
    return table


class CXRCache:
    """A finished cache: ``pixels`` (memmap uint8 [N, S, S]), ``index`` (DataFrame), ``meta``."""

    def __init__(self, root: os.PathLike | str, verify: bool = False):
        self.root = Path(root)
        marker = self.root / COMPLETE
        if not marker.is_file():
            hint = " (prepare was interrupted or is still running: re-run `cxrvit prepare` to finish it)"
            raise IncompleteCacheError(f"{self.root}: not a complete cxrvit cache, {COMPLETE} is missing{hint}")
        self.checksums: dict = json.loads(marker.read_text())
        self.meta: dict = json.loads((self.root / META).read_text())
        if self.meta.get("format") != FORMAT:
            raise IncompleteCacheError(f"{self.root}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.size: int = int(self.meta["size"])
        n = int(self.meta["n"])
        expected = n * self.size * self.size
        actual = (self.root / PIXELS).stat().st_size
        if actual != expected:
            raise IncompleteCacheError(f"{self.root / PIXELS}: {actual} bytes, expected {expected} ({n} x {self.size}^2)")
        if verify:
            self.verify()
        self.index: pd.DataFrame = read_index_csv(self.root / INDEX)
        if len(self.index) != n:
            raise IncompleteCacheError(f"{self.root / INDEX}: {len(self.index)} rows, meta.json says {n}")
        self.pixels = self._open_pixels()

    def _open_pixels(self) -> np.ndarray:
        # An empty memmap cannot be created; a zero-image cache gets an empty array instead.
        shape = (int(self.meta["n"]), self.size, self.size)
        return np.memmap(self.root / PIXELS, dtype=np.uint8, mode="r", shape=shape) if shape[0] else np.zeros(shape, np.uint8)

    def __getstate__(self) -> dict:
        # A pickled memmap carries all its bytes; worker processes re-map the file instead.
        return {k: v for k, v in self.__dict__.items() if k != "pixels"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.pixels = self._open_pixels()

    def verify(self) -> None:
        """Recompute the checksums recorded in COMPLETE; raise naming the first file that differs."""
        for name, digest in self.checksums["sha256"].items():
            if sha256_file(self.root / name) != digest:
                raise IncompleteCacheError(f"{self.root / name}: checksum differs from {COMPLETE}: the cache is corrupt")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labelled(self) -> bool:
        return bool(self.meta["labelled"])

    @property
    def patient_ids(self) -> np.ndarray:
        return self.index["patient_id"].to_numpy(dtype=object)

    @property
    def names(self) -> np.ndarray:
        return self.index["image"].to_numpy(dtype=object)

    def labels(self, names: Sequence[str]) -> np.ndarray:
        """float32 ``[N, K]`` multi-hot matrix; derived targets (Mass/Nodule) are computed here."""
        if not self.labelled:
            raise ValueError(f"{self.root}: an unlabelled cache has no labels")
        return label_matrix(lambda finding: self.index[finding].to_numpy(), names)

    def __repr__(self) -> str:
        return f"CXRCache({str(self.root)!r}, n={len(self)}, size={self.size}, labelled={self.labelled})"


# ---------------------------------------------------------------------------------------------
# Planning: which images go in, in which order, with which metadata


@dataclass
class Plan:
    table: pd.DataFrame  # every candidate image, in cache order
    meta: dict  # everything meta.json says except the outcome (n, bad images)
    report_lines: list[str]

    def key(self) -> str:
        """Identity of the work: a partial run is resumed only by a run with the same key."""
        text = self.table.to_csv(index=False, lineterminator="\n") + json.dumps(self.meta, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def plan_cache(
    data: os.PathLike | str,
    size: int,
    *,
    csv: os.PathLike | str | None = None,
    unlabelled: bool | None = None,
    patients: os.PathLike | str | None = None,
    views: Sequence[str] | None = None,
    exclude: Sequence[os.PathLike | str] = (),
    strict: bool = False,
) -> Plan:
    """Find the images and metadata under ``data`` and decide what the cache will contain."""
    data = Path(data)
    if size < 8:
        raise ValueError(f"--size {size} is too small")
    if csv and unlabelled:
        raise ValueError("--csv and --unlabelled contradict each other: give one")
    found = index_mod.find_images(data, exclude=exclude)
    csv_path = Path(csv) if csv else (None if unlabelled else nih.find_data_entry(data))
    meta: dict = {"format": FORMAT, "size": int(size), "source": str(data.resolve()), "geometry": GEOMETRY}
    lines: list[str] = [f"{len(found.paths):,} image files found under {data}"]
    if found.ignored:
        lines.append(f"{len(found.ignored):,} image files ignored, named other than "
                     f"{'/'.join(sorted(index_mod.IMAGE_EXTENSIONS))} (rename them to cache them): "
                     + ", ".join(found.ignored[:index_mod.EXAMPLES])
                     + (", ..." if len(found.ignored) > index_mod.EXAMPLES else ""))
    if csv_path is None:
        why = "--unlabelled was given" if unlabelled else "no Data_Entry_2017 CSV was found (use --csv to name one)"
        table, ids = index_mod.unlabelled_table(found, index_mod.read_patients(patients) if patients else None)
        named = f"{ids['csv']:,} from {patients}, " if patients else ""
        lines.append(f"unlabelled cache: {why}; patient IDs: {named}{ids['dicom']:,} from DICOM headers, "
                     f"{ids['stem']:,} from file stems")
        if patients and ids["dicom"] + ids["stem"]:
            lines.append(f"{ids['dicom'] + ids['stem']:,} images are not named in {patients}; their DICOM header's "
                         "PatientID, else their file stem, is their patient ID")
        meta.update(labelled=False, csv=None, patients_csv=str(patients) if patients else None)
        report_meta = {"unlisted_present": 0, "listed_absent": 0, "duplicate_names": len(found.duplicates)}
        if found.duplicates:
            lines.append(f"{len(found.duplicates)} file names occur more than once; the first path is used")
    else:
        entry = nih.read_data_entry(csv_path)
        report = index_mod.reconcile(entry.table["image"], found)
        split_paths = nih.find_split_lists(data)
        split_lists = {k: nih.read_split_list(p) for k, p in split_paths.items()}
        table = index_mod.labelled_table(entry.table, found, report, split_lists)
        lines.append(f"labelled cache: {csv_path} ({entry.variant} format, {len(entry):,} rows)")
        lines += report.lines()
        lines.append(
            "official split lists: " + (", ".join(f"{k}={p}" for k, p in split_paths.items()) or "none found")
        )
        if strict and not report.complete:
            raise DataReportError("--strict: the data folder does not match the metadata:\n  " + "\n  ".join(report.lines()))
        meta.update(labelled=True, csv=str(Path(csv_path).resolve()), csv_variant=entry.variant,
                    split_lists={k: str(p.resolve()) for k, p in split_paths.items()})
        report_meta = report.to_meta()
    if views:
        wanted = sorted({v.strip().upper() for v in views})
        keep = table["view"].isin(wanted).to_numpy()
        lines.append(f"views: keeping {', '.join(wanted)} ({int(keep.sum()):,} images), dropping {int((~keep).sum()):,}")
        table = table[keep].reset_index(drop=True)
        meta["views_filter"] = wanted
    else:
        counts = table["view"].replace("", "unknown").value_counts().sort_index()
        lines.append("views: all kept (" + ", ".join(f"{v} {c:,}" for v, c in counts.items()) + "); --views PA to filter")
        meta["views_filter"] = None
    meta.update(report_meta)
    return Plan(table=table, meta=meta, report_lines=lines)


# ---------------------------------------------------------------------------------------------
# Writing: resumable, crash-safe (the work folder and its carry-over live in cxrvit.data.resume)


def prepare_cache(
    data: os.PathLike | str,
    out: os.PathLike | str,
    size: int = 256,
    *,
    csv: os.PathLike | str | None = None,
    unlabelled: bool | None = None,
    patients: os.PathLike | str | None = None,
    views: Sequence[str] | None = None,
    workers: int | None = None,
    strict: bool = False,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    flush_seconds: float = 1.0,
) -> CXRCache:
    """Build (or resume, or confirm) the cache of ``data`` in ``out``. See ``cxrvit prepare --help``."""
    out = Path(out)
    plan = plan_cache(data, size, csv=csv, unlabelled=unlabelled, patients=patients, views=views,
                      exclude=[out], strict=strict)
    for line in plan.report_lines:
        log(line)
    if len(plan.table) == 0:
        raise ValueError(f"{data}: no images to cache ({'; '.join(plan.report_lines[-2:])})")
    key = plan.key()
    finished_paths: list[str] | None = None  # a finished --skip-bad cache whose left-out images now decode
    if (out / COMPLETE).is_file():
        done_key = json.loads((out / COMPLETE).read_text()).get("plan")
        if done_key == key and not overwrite:
            finished = CXRCache(out)
            if not _left_out_now_decode(finished, plan, Path(data), skip_bad, log):
                return finished
            finished_paths = finished.index["path"].tolist()
            del finished  # its files are replaced below; nothing may keep them mapped
        elif not overwrite:
            raise FileExistsError(f"{out}: holds a finished cache built from other inputs; use --overwrite or another --out")
        else:
            (out / COMPLETE).unlink()  # first, so the folder never looks complete while it is rebuilt
    out.mkdir(parents=True, exist_ok=True)
    work, aside = resume.open_work(out, key, plan.meta, log)
    resumed = work.is_dir()
    work.mkdir(exist_ok=True)
    paths = plan.table["path"].tolist()
    resume.write_plan(work, key, paths, plan.meta)

    n_all, s = len(plan.table), int(size)
    done = resume.load_progress(work, n_all) if resumed else np.zeros(n_all, dtype=bool)
    if resumed:
        log(f"resuming: {int(done.sum()):,} of {n_all:,} images already done")
    bad: list[tuple[int, str]] = []
    pixels = resume.open_pixels(work, n_all, s, done) if not done.all() else None
    if pixels is not None:
        sources = [aside, resume.finished_source(out, finished_paths) if finished_paths is not None else None]
        for source in filter(None, sources):
            carried = resume.carry_rows(source, paths, pixels, done)
            log(f"resuming: carried over {carried:,} finished image(s) from {source.what}")
        resume.save_progress(work, pixels, done)  # the carried rows are safe from here on
    resume.drop_aside(out)
    if (out / COMPLETE).is_file():  # a finished cache being rebuilt: its rows are in the work now
        (out / COMPLETE).unlink()
    if pixels is not None:
        bad = resume.decode_rows(paths, pixels, done, work, Path(data), workers, progress, flush_seconds)
        del pixels
    bad_list = [(str(Path(data) / paths[row]), reason) for row, reason in sorted(bad)]
    if bad_list:
        resume.write_file(work / BAD_LIST, "".join(f"{p}\t{r}\n" for p, r in bad_list))
        if not skip_bad:
            raise BadImagesError(bad_list, f"\n(list saved in {work / BAD_LIST}; fix or remove them and re-run to "
                                           "resume, or pass --skip-bad to build the cache without them)")
        log(f"--skip-bad: leaving out {len(bad_list)} unreadable image(s), listed in {out / BAD_LIST}")
    _finalize(plan, key, out, work, [row for row, _ in bad], bad_list)
    return CXRCache(out)


def _left_out_now_decode(finished: CXRCache, plan: Plan, data: Path, skip_bad: bool,
                         log: Callable[[str], None]) -> bool:
    """A finished cache of these inputs: True when images it left out as unreadable decode now (rebuild it).

    Only the left-out files are decoded here, which is cheap. When they all still fail, the cache stands
    (``skip_bad``) or the run fails naming them (without ``skip_bad``: it must not silently accept a cache
    that lacks images); either way the finished cache is left untouched and usable.
    """
    if not finished.meta.get("bad_images"):
        log(f"{finished.root}: already complete with these inputs; nothing to do")
        return False
    kept = set(finished.index["path"])
    left_out = [(row, path) for row, path in enumerate(plan.table["path"]) if path not in kept]
    results = [resume.decode_one((row, str(data / path), finished.size)) for row, path in left_out]
    still_bad = [(str(data / path), reason) for (_, path), (_, buf, reason) in zip(left_out, results) if buf is None]
    if still_bad and not skip_bad:
        raise BadImagesError(still_bad, f"\n({finished.root} was built with --skip-bad without them and stays "
                                        "usable; fix them and re-run to add them, or pass --skip-bad to use it as it is)")
    if len(still_bad) == len(left_out):
        log(f"{finished.root}: already complete with these inputs; nothing to do ({len(still_bad)} unreadable "
            f"image(s) left out, listed in {finished.root / BAD_LIST}: re-run after fixing them to add them)")
        return False
    log(f"{finished.root}: {len(left_out) - len(still_bad)} of {len(left_out)} image(s) left out as unreadable "
        f"now decode: rebuilding the cache with them")
    return True


def _finalize(plan: Plan, key: str, out: Path, work: Path, bad_rows: list[int], bad_list: list[tuple[str, str]]) -> None:
    """Move the finished work into place; every step can be repeated after a crash."""
    keep = np.setdiff1d(np.arange(len(plan.table)), np.asarray(bad_rows, dtype=np.int64))
    s = int(plan.meta["size"])
    final, work_pixels = out / PIXELS, work / PIXELS
    if bad_rows:  # copy the good rows into a compact file; the work file stays until COMPLETE exists
        src = np.memmap(work_pixels, dtype=np.uint8, mode="r", shape=(len(plan.table), s, s))

        def write_rows(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                for start in range(0, len(keep), 1024):
                    fh.write(np.ascontiguousarray(src[keep[start : start + 1024]]).tobytes())

        atomic_write(final, write_rows, fsync=True)
        del src
    elif work_pixels.is_file():
        os.replace(work_pixels, final)
    elif len(keep) == 0:
        final.write_bytes(b"")
    elif not (final.is_file() and final.stat().st_size == len(keep) * s * s):
        raise IncompleteCacheError(f"{out}: work pixels are missing; delete {out} and run prepare again")
    table = plan.table.iloc[keep].reset_index(drop=True)
    resume.write_file(out / INDEX, table.to_csv(index=False, lineterminator="\n"))
    meta = dict(plan.meta, n=len(table), bad_images=[{"path": p, "reason": r} for p, r in bad_list],
                label_columns=list(nih.LABEL_COLUMNS) if plan.meta["labelled"] else [])
    resume.write_file(out / META, json.dumps(meta, indent=2) + "\n")
    if bad_list:
        resume.write_file(out / BAD_LIST, "".join(f"{p}\t{r}\n" for p, r in bad_list))
    elif (out / BAD_LIST).exists():
        (out / BAD_LIST).unlink()
    sums = {name: sha256_file(out / name) for name in (PIXELS, INDEX, META)}
    resume.write_file(out / COMPLETE, json.dumps({"plan": key, "sha256": sums}, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
