"""The linear probe's feature pass: frozen-backbone features of every training image and view, resumable.

The pass is most of a probe's cost (one ViT forward per image and view: ~8.5 h for 86,524 images on 2 CPU
cores), so it is written in chunks of :data:`CHUNK_IMAGES` images into ``RUN/features.partial/`` as it goes,
each chunk file written atomically. ``manifest.json`` there records what the features depend on (the
backbone's key, the rows, the views, the chunk and batch sizes); on ``--resume`` a matching folder's chunks
are read back and only the missing ones computed, a folder of another backbone or config is discarded (a
log line names it). When every chunk is there the features are assembled into ``RUN/features.npz``
(atomically) and the folder is deleted.

Bit-identical to one uninterrupted pass: view 0 is the deterministic scoring view; the augmented views draw
from one ``BatchAugment`` generator (seed ``engine.seed + 1``) sequentially over views 1.. and batches, as the
single pass always did. A chunk is a whole number of batches of one view, so its batches (and each batch's
draws) are the single pass's, and each chunk file stores the generator's state after it: a resumed pass
restarts the generator from the last chunk before a missing one, so every chunk's draws are a function of
(seed, view, position) alone, never of what this process computed before.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cxrvit.data.preprocess import Preprocessing, eval_transform
from cxrvit.fileio import atomic_write
from cxrvit.model.vit import VisionTransformer
from cxrvit.training.augment import BatchAugment
from cxrvit.training.config import TrainConfig, config_to_dict

FEATURES = "features.npz"       # resume: extraction is most of the cost, fitting takes seconds
PARTIAL = "features.partial"    # the chunks of an unfinished pass
MANIFEST = "manifest.json"
#: Images per chunk file: ~90 s of ViT-S/16 at 224 px on 2 CPU cores (0.35 s an image), the most a kill loses.
CHUNK_IMAGES = 256
#: Images per forward pass; a chunk must be a whole number of them (the single pass's batches and draws).
BATCH_SIZE = 64
_UNREADABLE = (zipfile.BadZipFile, ValueError, KeyError, EOFError, OSError)


@torch.no_grad()
def head_features(model: VisionTransformer, cache, rows: np.ndarray, size: int, prep: Preprocessing,
                  augment: BatchAugment | None = None, batch_size: int = BATCH_SIZE,
                  device: torch.device | str = "cpu", progress=None) -> np.ndarray:
    """``[len(rows), D]`` what the head reads, in fp32: ``forward_head(pre_logits=True)`` (the final-norm CLS
    token, the mean of the patch tokens, or a pair of them side by side: ``model.global_pool``).

    Without ``augment`` this is the scoring pass's view (whole image resized to ``size``), so a head fitted
    on these features sees at ``predict`` time exactly what it was fitted on.
    """
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = np.asarray(rows[start:start + batch_size])
        grey = torch.from_numpy(np.ascontiguousarray(cache.pixels[chunk]))[:, None].to(device)
        x = augment(grey)[0] if augment is not None else eval_transform(grey, size)
        out.append(model.forward_head(model.forward_features(prep.normalize(x)), pre_logits=True).float().cpu())
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out).numpy().astype(np.float64)


def features_key(cfg: TrainConfig, init) -> str:
    """What the features depend on; the head's settings (C grid, folds) are free to change on resume."""
    key = [cfg.model.arch, cfg.model.img_size, cfg.engine.seed, config_to_dict(cfg)["augment"],
           str(Path(init).resolve()) if init else None]
    if cfg.model.pos_embed != "random":   # appended only when set, so features cached before the key still match
        key.append(cfg.model.pos_embed)
    if cfg.model.global_pool != "token":
        key.append(f"pool={cfg.model.global_pool}")
    if cfg.model.n_last_blocks != 1:
        key.append(f"blocks={cfg.model.n_last_blocks}")
    return json.dumps(key)


def load_features(path: Path, rows: np.ndarray, views: int, key: str) -> np.ndarray | None:
    """The cached features when they are these rows' and this backbone's, else None (extract them again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if np.array_equal(z["rows"], rows) and int(z["views"]) == views and str(z["fingerprint"]) == key:
                return z["feats"]
    except _UNREADABLE as exc:
        # A torn file (written in place by versions before the atomic write) or a foreign one: only a cache.
        print(f"linear probe: {path} is unreadable ({type(exc).__name__}: {exc}); extracting the features again",
              file=sys.stderr, flush=True)
    return None


def probe_features(out: Path, model, cache, rows: np.ndarray, cfg: TrainConfig, init, prep: Preprocessing, dev,
                   resume: bool, progress: bool) -> np.ndarray:
    """``[views * len(rows), D]`` (view-major; view 0 the scoring view): ``RUN/features.npz`` when ``resume``
    finds it valid, else the (resumable) feature pass, saved there."""
    path, work, key = out / FEATURES, out / PARTIAL, features_key(cfg, init)
    feats = load_features(path, rows, cfg.probe.views, key) if resume else None
    if feats is None:
        feats = extract_features(model, cache, rows, cfg, prep, dev, work, key, progress)
        # Atomically: a kill mid-write must leave no torn file for the next --resume to trip on.
        atomic_write(path, lambda tmp: np.savez(tmp, rows=rows, feats=feats, views=cfg.probe.views, fingerprint=key))
    if work.exists():                     # done with (or left over beside a valid features.npz)
        shutil.rmtree(work)
    return feats


def extract_features(model, cache, rows: np.ndarray, cfg: TrainConfig, prep: Preprocessing, dev, work: Path,
                     key: str, progress: bool) -> np.ndarray:
    """The feature pass in chunks under ``work``, reusing the chunks a killed pass of the same features left."""
    if CHUNK_IMAGES % BATCH_SIZE:
        raise ValueError(f"CHUNK_IMAGES ({CHUNK_IMAGES}) must be a multiple of BATCH_SIZE ({BATCH_SIZE})")
    views, size = cfg.probe.views, cfg.model.img_size
    _open_partial(work, {"format": 1, "fingerprint": key, "rows": len(rows),
                         "rows_sha256": hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest(),
                         "views": views, "img_size": size, "seed": cfg.engine.seed,
                         "chunk_images": CHUNK_IMAGES, "batch_size": BATCH_SIZE})
    spans = [(v, s) for v in range(views) for s in range(0, len(rows), CHUNK_IMAGES)]
    paths = [work / f"chunk-{v}-{s // CHUNK_IMAGES:06d}.npz" for v, s in spans]
    saved = [_read_chunk(p, rows[s:s + CHUNK_IMAGES]) for p, (_, s) in zip(paths, spans)]
    resumed, total = sum(len(f) for f, _ in filter(None, saved)), len(rows) * views
    if resumed:
        print(f"linear probe: resuming the feature pass from {work}: {resumed} of {total} image views are done",
              file=sys.stderr, flush=True)
    bar = tqdm(total=total, initial=resumed, unit="img", desc="features", dynamic_ncols=True) if progress else None
    augment = BatchAugment(cfg.augment, size, seed=cfg.engine.seed + 1)
    parts = []
    try:
        for path, (v, s), got in zip(paths, spans, saved):
            if got is not None:           # continue the draws where that chunk left them
                feats, state = got
                augment.load_state_dict({"generator": torch.from_numpy(state)})
            else:
                chunk = rows[s:s + CHUNK_IMAGES]
                feats = head_features(model, cache, chunk, size, prep, augment if v else None, BATCH_SIZE, dev,
                                      bar.update if bar is not None else None)
                state = augment.state_dict()["generator"].numpy()
                atomic_write(path, lambda tmp: np.savez(tmp, rows=chunk, feats=feats, generator=state))
            parts.append(feats)
    finally:
        if bar is not None:
            bar.close()
    return np.concatenate(parts)


def _open_partial(work: Path, manifest: dict) -> None:
    """Make ``work`` a chunk folder of these features: kept when its manifest is ``manifest``, else discarded."""
    if work.exists():
        try:
            old = json.loads((work / MANIFEST).read_text())
        except (OSError, ValueError):
            old = None
        if old == manifest:
            return
        differ = ("no readable manifest" if not isinstance(old, dict) else
                  ", ".join(k for k in sorted(set(old) | set(manifest)) if old.get(k) != manifest.get(k)))
        print(f"linear probe: discarding {work}: its chunks are of other features ({differ}); extracting from "
              f"the start", file=sys.stderr, flush=True)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    atomic_write(work / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))


def _read_chunk(path: Path, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """A chunk's features and the augmentation generator's state after it, or None when it is still to do."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if np.array_equal(z["rows"], rows) and len(z["feats"]) == len(rows):
                return z["feats"], z["generator"]
        reason = "of other rows"
    except _UNREADABLE as exc:
        reason = f"unreadable ({type(exc).__name__}: {exc})"
    print(f"linear probe: {path} is {reason}; extracting that chunk again", file=sys.stderr, flush=True)
    return None
