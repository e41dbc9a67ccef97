"""A tiny real cache for the training tests: 96 NIH sample images at 32 px.

Built once per test session from ../shared/data/nih-sample (real images, real labels and the
official split, trimmed to the chosen images) with the project's own ``prepare_cache``.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from trainhelp import ALL_ON, FT_RECIPE, TINY

_SHARED_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "nih-sample"
# The real sample from ../shared when it is there, else the downsampled copy shipped in sample/ (same layout).
SAMPLE = _SHARED_SAMPLE if (_SHARED_SAMPLE / "images").is_dir() else Path(__file__).resolve().parents[2] / "sample" / "nih-sample"
N_IMAGES = 96


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory) -> Path:
    if not (SAMPLE / "images").is_dir():
        pytest.skip(f"real NIH sample not found at {SAMPLE} (../shared/data is not mounted)")
    from cxrvit.data.cache import prepare_cache

    root = tmp_path_factory.mktemp("tiny_nih")
    (root / "images").mkdir()
    names = sorted(p.name for p in (SAMPLE / "images").glob("*.png"))[:N_IMAGES]
    for name in names:
        os.symlink(SAMPLE / "images" / name, root / "images" / name)
    wanted = set(names)
    with gzip.open(SAMPLE / "Data_Entry_2017_v2020.csv.gz", "rt") as f:
        lines = f.read().splitlines()
    rows = [lines[0]] + [line for line in lines[1:] if line.split(",", 1)[0] in wanted]
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(rows) + "\n")
    for split in ("train_val_list.txt", "test_list.txt"):
        listed = [n for n in (SAMPLE / split).read_text().split() if n in wanted]
        (root / split).write_text("\n".join(listed) + "\n")
    out = tmp_path_factory.mktemp("tiny_cache") / "cache"
    prepare_cache(root, out, 32, progress=False, workers=1, log=lambda _msg: None)
    return out


@pytest.fixture(scope="session")
def tiny_cache(tiny_cache_dir):
    from cxrvit.data.cache import CXRCache

    return CXRCache(tiny_cache_dir)


@pytest.fixture
def one_thread():
    """The CI machine has 2 cores shared with other jobs: one intra-op thread avoids thrashing,
    and identical thread counts keep in-process and subprocess runs bit-comparable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_init(tmp_path_factory) -> Path:
    """A random ViT-Tiny backbone saved the way pre-training exports one: the shared run's ``--init``, without
    which layer decay (ALL_ON's ``optim.layer_decay``) would be off and the resume and DDP tests not cover it."""
    import torch

    from cxrvit.ssl.encoder import build_encoder, export_backbone

    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("init") / "backbone.safetensors"
    export_backbone(build_encoder("vit_tiny", depth=12), path, arch="vit_tiny", method="mae", cls_token="test")
    return path


@pytest.fixture(scope="session")
def tiny_reference_run(tiny_cache, tiny_init, tmp_path_factory):
    """One uninterrupted single-process TINY run from ``tiny_init``, shared by the engine, resume and DDP tests."""
    import torch

    from cxrvit.training.commands import choose_rows
    from cxrvit.training.config import load_recipe
    from cxrvit.training.engine import train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_recipe(FT_RECIPE, TINY + ALL_ON)
        tr, va, _ = choose_rows(tiny_cache, cfg.data.val_fraction, cfg.data.split_seed)
        out = tmp_path_factory.mktemp("reference") / "run"
        train(cfg, tiny_cache, tr, va, out, init=str(tiny_init), progress=False)
    finally:
        torch.set_num_threads(before)
    return cfg, tr, va, out
