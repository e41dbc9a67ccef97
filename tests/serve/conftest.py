"""Shared fixtures for the server tests: a random-weight vit_tiny bundle at 32 px and the real DICOMs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxrvit.data.preprocess import Preprocessing
from cxrvit.inference.bundle import load_bundle, save_bundle
from cxrvit.labels import DEFAULT_LABELS
from cxrvit.model.vit import vit_tiny
from serve_support import THRESHOLDS, real_dicoms


@pytest.fixture(scope="session")
def serve_bundle_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vit_tiny(num_classes=len(DEFAULT_LABELS))
    return save_bundle(tmp_path_factory.mktemp("serve-bundle"), model, list(DEFAULT_LABELS), THRESHOLDS,
                       Preprocessing(size=32), arch="vit_tiny",
                       threshold_source={"split": "val", "images": ["a.png", "b.png"]})


@pytest.fixture(scope="session")
def serve_bundle(serve_bundle_dir):
    return load_bundle(serve_bundle_dir)


@pytest.fixture(scope="session")
def dicoms(tmp_path_factory) -> dict[str, Path]:
    return real_dicoms(tmp_path_factory.mktemp("dicoms"))
