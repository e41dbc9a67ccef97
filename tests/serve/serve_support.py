"""Constants and input files for tests/serve (a uniquely named module, not a second ``conftest``)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from cxrvit.labels import DEFAULT_LABELS

ROOT = Path(__file__).resolve().parents[2]
SHARED_DICOM = ROOT.parent / "shared" / "data" / "dicom"
_spec = importlib.util.spec_from_file_location("dicom_factory_serve", ROOT / "tests/fixtures/dicom/factory.py")
factory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(factory)

#: Thresholds that make some labels positive and some not, whatever the random model says.
THRESHOLDS = {label: (0.0 if i % 2 == 0 else 1.01) for i, label in enumerate(DEFAULT_LABELS)}


def real_dicoms(tmp: Path) -> dict[str, Path]:
    """``cxr`` (a chest PA), ``not_cxr`` (an OT object) and ``corrupt`` (a truncated CXR DICOM).

    The real files of ../shared/data/dicom when present (the CXR is then the JPEG-Baseline CR);
    otherwise DICOMs built from the real NIH pixels of tests/fixtures/dicom/cxr64.png.
    ``real`` says which.
    """
    if (SHARED_DICOM / "siim-cr-chest-pa-jpeg-baseline.dcm").is_file():
        out = {"cxr": SHARED_DICOM / "siim-cr-chest-pa-jpeg-baseline.dcm",
               "not_cxr": SHARED_DICOM / "not-a-cxr-ot.dcm", "real": True}
    else:
        # upscaled to 512 px so that it is not flagged low-resolution, like the real file
        big = np.asarray(Image.fromarray(factory.real_pixels()).resize((512, 512), Image.BILINEAR))
        out = {"cxr": factory.make_dicom(tmp / "cxr.dcm", big, modality="CR"),
               "not_cxr": factory.make_dicom(tmp / "ot.dcm", modality="OT", body_part=None, view=None),
               "real": False}
    data = out["cxr"].read_bytes()
    (tmp / "corrupt.dcm").write_bytes(data[: len(data) // 2])
    out["corrupt"] = tmp / "corrupt.dcm"
    return out
