"""Tiny real-image fakes for the SSL tests: a few NIH sample PNGs at 64 px, held in memory, and a tiny config.

A module of its own (not conftest.py, which every test folder has: ``from conftest import`` got whichever
folder's conftest pytest had loaded last).

The object mimics the parts of ``CXRCache`` the SSL code reads (``pixels``, ``labels()``,
``patient_ids``, ``len``), so these tests run before/without a prepared cache on disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrvit.labels import NIH_FINDINGS, NO_FINDING, label_matrix
from cxrvit.ssl.config import config_from_dict

# One thread: on a shared 2-core machine, OpenMP threads waiting for each other cost more than
# they gain on these tiny tensors (a 2-thread linear was ~7x slower than 1 thread under load).
torch.set_num_threads(1)

_SHARED_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "nih-sample"
# The real sample from ../shared when it is there, else the downsampled copy shipped in sample/ (same layout).
DATA = _SHARED_SAMPLE if (_SHARED_SAMPLE / "images").is_dir() else Path(__file__).resolve().parents[2] / "sample" / "nih-sample"
SIZE = 64


@dataclass
class ArrayCache:
    pixels: np.ndarray                   # uint8 [N, S, S]
    index: pd.DataFrame
    meta: dict = field(default_factory=lambda: {"labelled": True})

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def size(self) -> int:
        return self.pixels.shape[-1]

    @property
    def patient_ids(self) -> np.ndarray:
        return self.index["patient_id"].astype(str).to_numpy()

    def labels(self, names):
        return label_matrix(lambda f: self.index[f].to_numpy(), names)


def load_tiny(n: int) -> ArrayCache:
    if not (DATA / "images").is_dir():
        pytest.skip(f"real NIH sample not found at {DATA} (the SSL tests use a few of its images)")
    entries = pd.read_csv(DATA / "Data_Entry_2017_v2020.csv.gz", usecols=["Image Index", "Finding Labels", "Patient ID"])
    present = sorted(p.name for p in (DATA / "images").glob("*.png"))[:n]
    entries = entries.set_index("Image Index").loc[present]
    pix = np.stack([np.asarray(Image.open(DATA / "images" / name).convert("L").resize((SIZE, SIZE), Image.BILINEAR))
                    for name in present])
    index = pd.DataFrame({"image": present, "patient_id": entries["Patient ID"].astype(str).to_numpy()})
    for f in NIH_FINDINGS + (NO_FINDING,):
        index[f] = entries["Finding Labels"].str.split("|").apply(lambda labs: int(f in labs)).to_numpy()
    return ArrayCache(pix, index)


def tiny_config(method: str, **sections):
    """A 2-block ViT-Tiny with 8-px patches on 32-px views: the real code path, at test speed."""
    d = {"method": method, "model": {"arch": "vit_tiny", "depth": 2, "patch_size": 8},
         "schedule": {"epochs": 2, "batch_size": 8}, "optim": {"warmup_epochs": 0, "lr": 1e-3},
         "probe": {"every_epochs": 0, "size": 32, "k": 5},
         "engine": {"precision": "fp32", "log_every": 1, "checkpoint_every": 2},
         "dino": {"global_size": 32, "local_size": 16, "n_local": 2, "out_dim": 128, "hidden_dim": 64,
                  "bottleneck_dim": 32, "warmup_teacher_temp_epochs": 1},
         "mae": {"size": 32, "mask_ratio": 0.75, "decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4},
         "ijepa": {"size": 32, "predictor_dim": 64, "predictor_depth": 1, "predictor_heads": 4,
                   "target_scale": [0.1, 0.15]}}
    for section, values in sections.items():
        if isinstance(values, dict):
            d.setdefault(section, {}).update(values)
        else:
            d[section] = values
    return config_from_dict(d)
