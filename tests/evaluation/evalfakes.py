"""Tiny in-memory stand-ins for a prepared cache and a trained bundle.

The fake cache implements exactly the documented CXRCache contract (pixels, index, meta, size,
labels(), patient_ids), so these tests exercise evaluation without the data part's I/O.
``nih_tiny_cache`` is the real thing for the slow tests: a fixture that the evaluation and the
experiments conftests both import.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrvit.data.preprocess import Preprocessing
from cxrvit.inference.bundle import save_bundle
from cxrvit.labels import NIH_FINDINGS, NO_FINDING, label_matrix
from cxrvit.model.vit import build_model

LABELS = ["Atelectasis", "Effusion", "Mass/Nodule", "Cardiomegaly"]


class FakeCache:
    def __init__(self, n_patients=40, images_per_patient=(1, 3), size=32, seed=0, test_fraction=0.3):
        rng = np.random.default_rng(seed)
        rows = []
        for p in range(n_patients):
            official = "test" if p < int(n_patients * test_fraction) else "train_val"
            for j in range(rng.integers(images_per_patient[0], images_per_patient[1] + 1)):
                row = {"image": f"{p + 1:08d}_{j:03d}.png", "patient_id": str(p + 1), "official_split": official}
                findings = rng.random(len(NIH_FINDINGS)) < 0.25
                row.update({f: int(v) for f, v in zip(NIH_FINDINGS, findings)})
                row[NO_FINDING] = int(not findings.any())
                rows.append(row)
        self.index = pd.DataFrame(rows)
        self.size = size
        self.meta = {"format": "cxrvit-cache/1", "size": size, "n": len(rows), "labelled": True}
        # Images carry a weak signal for Effusion (brighter) so a trained model could find it.
        base = rng.integers(0, 200, size=(len(rows), size, size)).astype(np.int16)
        base += 50 * self.index["Effusion"].to_numpy()[:, None, None]
        self.pixels = np.clip(base, 0, 255).astype(np.uint8)
        self.patient_ids = self.index["patient_id"].astype(str).to_numpy()

    def __len__(self):
        return len(self.index)

    def labels(self, names):
        return label_matrix(lambda f: self.index[f].to_numpy(), names)


_MODELS: dict = {}


def tiny_model(num_classes: int, seed: int = 0):
    """A randomly initialised vit_tiny; built once per (K, seed) because init is slow on a busy CPU."""
    key = (num_classes, seed)
    if key not in _MODELS:
        torch.manual_seed(seed)
        _MODELS[key] = build_model("vit_tiny", num_classes=num_classes).eval()
    return _MODELS[key]


def make_bundle(path, cache, val_rows, labels=LABELS, size=32, seed=0, source_size=None):
    model = tiny_model(len(labels), seed)
    thresholds = {name: 0.5 for name in labels}
    names = cache.index["image"].to_numpy()[val_rows].tolist()
    return save_bundle(path, model, list(labels), thresholds, Preprocessing(size=size, source_size=source_size),
                       arch="vit_tiny",
                       threshold_source={"split": "val", "images": names})


_SHARED_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "nih-sample"
# The real sample from ../shared when it is there, else the downsampled copy shipped in sample/ (same layout).
SAMPLE = _SHARED_SAMPLE if (_SHARED_SAMPLE / "images").is_dir() else Path(__file__).resolve().parents[2] / "sample" / "nih-sample"


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
