"""``predict`` over pydicom's own test corpus: DICOM nobody here wrote, every one scored or refused with a reason.

The files ship inside the pydicom package (``pydicom/data/test_files``); nothing is downloaded. The
counts are pinned so that a reader change that turns a scored file into a refusal (or back) is seen.
"""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from cxrvit.inference.predict import predict_files

CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"
FILES = sorted(CORPUS.rglob("*.dcm"))

#: Refused on purpose, with the words the reason must contain.
EXPECTED_REFUSALS = {
    "JPEG-lossy.dcm": "JPEG Extended",  # 12-bit lossy JPEG whose scan header libjpeg and Pillow reject
    "JPEG2000-embedded-sequence-delimiter.dcm": "JPEG 2000",  # no codec can read its codestream header
    "MR_truncated.dcm": "less than expected",
    "examples_palette.dcm": "PALETTE COLOR",
    "ExplVR_BigEndNoMeta.dcm": "no pixel data",  # big endian, no file meta: recognised, an RT plan
    "rtplan.dcm": "no pixel data",
    "badVR.dcm": "1A",
}


@pytest.mark.skipif(len(FILES) < 70, reason="pydicom's bundled test files are not installed")
def test_every_corpus_file_is_scored_or_refused_with_a_reason(bundle):
    rows = predict_files(bundle, FILES, batch_size=16, progress=False)
    assert [r.path for r in rows] == [str(f) for f in FILES]
    by_name = {Path(r.path).name: r for r in rows}
    for r in rows:
        if r.status == "ok":
            assert set(r.probs) == set(bundle.labels) and all(0.0 <= p <= 1.0 for p in r.probs.values())
        else:
            assert r.status == "error" and Path(r.path).name in r.error and len(r.error) > len(r.path) + 10
    for name, reason in EXPECTED_REFUSALS.items():
        assert by_name[name].status == "error" and reason in by_name[name].error, (name, by_name[name].error)
    # colour secondary captures are read as grey and flagged; multi-frame objects give their first frame
    assert "colour_converted:RGB" in by_name["SC_rgb_rle.dcm"].qc_flags and by_name["SC_rgb_rle.dcm"].status == "ok"
    assert "colour_converted:YBR_FULL_422" in by_name["SC_ybr_full_422_uncompressed.dcm"].qc_flags
    assert "multi_frame:15" in by_name["rtdose.dcm"].qc_flags and by_name["rtdose.dcm"].status == "ok"
    # nothing in this corpus is a chest radiograph: every scored file carries at least one flag
    assert all(r.qc_flags for r in rows if r.status == "ok")
    scored = sum(r.status == "ok" for r in rows)
    assert (scored, len(rows) - scored) == (57, 22)
