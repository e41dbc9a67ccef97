"""Shared fixtures: a random-weight vit_tiny bundle at 32 px and the DICOM factory."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from cxrvit.data.preprocess import Preprocessing
from cxrvit.inference.bundle import save_bundle
from cxrvit.labels import DEFAULT_LABELS
from cxrvit.model.vit import vit_tiny

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
_spec = importlib.util.spec_from_file_location("dicom_factory", ROOT / "tests/fixtures/dicom/factory.py")
factory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(factory)

#: Thresholds that make some labels positive and some not, whatever the random model says.
THRESHOLDS = {label: (0.0 if i % 2 == 0 else 1.01) for i, label in enumerate(DEFAULT_LABELS)}


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
