"""Shared fixtures: a random-weight vit_tiny bundle at 32 px."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxrvit.data.preprocess import Preprocessing
from cxrvit.inference.bundle import save_bundle
from cxrvit.labels import DEFAULT_LABELS
from cxrvit.model.vit import vit_tiny
from inference_support import THRESHOLDS


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vit_tiny(num_classes=len(DEFAULT_LABELS))
    return save_bundle(tmp_path_factory.mktemp("bundle"), model, list(DEFAULT_LABELS), THRESHOLDS,
                       Preprocessing(size=32), arch="vit_tiny")


@pytest.fixture(scope="session")
def bundle(bundle_dir):
    from cxrvit.inference.bundle import load_bundle

    return load_bundle(bundle_dir)
