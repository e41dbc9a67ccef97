"""The templated preliminary report, the Grad-CAM peak location and the label choice for maps."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from cxrvit.data.images import square_placement
from cxrvit.inference import prelim_report as rp
from cxrvit.inference import qc
from cxrvit.inference.findings import MAX_LABELS, labels_to_explain, peak_location

THR = {"Atelectasis": 0.30, "Effusion": 0.40, "Mass/Nodule": 0.20}


def test_bands_and_sorting():
    assert [rp.band(p) for p in (0.95, 0.8, 0.6, 0.3, 0.05)] == ["very high", "very high", "high", "intermediate",
                                                                 "low"]
    calls = rp.assess({"Atelectasis": 0.1, "Effusion": 0.9, "Mass/Nodule": 0.5}, THR)
    assert [c.label for c in calls] == ["Effusion", "Mass/Nodule", "Atelectasis"]
    assert [c.call for c in calls] == [True, True, False]


def test_hedging_is_in_logit_distance_from_the_threshold():
    # threshold 0.40: logit -0.405; +-0.5 in logit is 0.289..0.525
    near = rp.assess({"Effusion": 0.45}, THR)[0]
    clear = rp.assess({"Effusion": 0.60}, THR)[0]
    miss = rp.assess({"Effusion": 0.33}, THR)[0]
    far = rp.assess({"Effusion": 0.05}, THR)[0]
    assert (near.call, near.near) == (True, True)
    assert (clear.call, clear.near) == (True, False)
    assert (miss.call, miss.near) == (False, True)
    assert (far.call, far.near) == (False, False)


def test_report_text_from_calls_with_location():
    peaks = {"Effusion": {"side": "right", "zone": "lower"}, "Atelectasis": {"side": "left", "zone": "middle"}}
    calls = rp.assess({"Effusion": 0.85, "Atelectasis": 0.33, "Mass/Nodule": 0.01}, THR, peaks)
    full = rp.render(calls, full=True)
    short = rp.render(calls, full=False)
    assert "FINDINGS: Effusion (very high: probability 0.85, operating point 0.40, lower zone, right side)." in full
    assert "Possible Atelectasis (borderline: probability 0.33, operating point 0.30, middle zone, left side)." in full
    assert "Below threshold: Mass/Nodule." in full
    assert "IMPRESSION: Effusion; possible Atelectasis." in full
    assert "FINDINGS: Effusion (very high: 0.85, lower zone, right side). Possible Atelectasis" in short
    assert "Below threshold" not in short and "operating point 0." not in short
    assert full.endswith(rp.DISCLAIMER) and short.endswith(rp.DISCLAIMER)


def test_no_finding_above_threshold_is_said_so():
    calls = rp.assess({"Effusion": 0.01, "Atelectasis": 0.02, "Mass/Nodule": 0.19}, THR)
    text = rp.render(calls, full=True)
    assert "No finding above threshold among the 3 labels assessed." in text
    assert "IMPRESSION: No finding above threshold." in text
    assert "normal" not in text.lower()
    # a near miss is still reported, hedged
    assert "Mass/Nodule cannot be excluded (probability 0.19, just below operating point 0.20)." in text


def test_qc_flags_lead_the_report():
    calls = rp.assess({"Effusion": 0.9}, THR)
    text = rp.render(calls, ["not_radiograph:OT", "low_resolution:200x200"], full=False)
    lines = text.splitlines()
    assert lines[1] == "INPUT QUALITY: not a projection radiograph (DICOM modality OT); low resolution (200x200 px)."
    assert "IMPRESSION: Input is probably not a frontal chest radiograph" in text
    mild = rp.render(calls, ["low_resolution:200x200"], full=False)
    assert "not a frontal chest radiograph" not in mild
    assert rp.qc_message("something_new:x") == "something_new:x"


def test_peak_location_uses_radiographic_sides_and_thirds():
    heat = np.zeros((90, 90), np.float32)
    heat[80, 10] = 1.0  # image left, bottom: the patient's right lower zone
    assert peak_location(heat)["side"] == "right" and peak_location(heat)["zone"] == "lower"
    heat[:] = 0
    heat[5, 80] = 1.0
    assert (peak_location(heat)["side"], peak_location(heat)["zone"]) == ("left", "upper")
    heat[:] = 0
    heat[45, 45] = 1.0
    assert (peak_location(heat)["side"], peak_location(heat)["zone"]) == ("central", "middle")


def _peak_at(y: float, x: float, size: int = 224) -> np.ndarray:
    heat = np.zeros((size, size), np.float32)
    heat[int(y * size), int(x * size)] = 1.0
    return heat


def test_peak_zone_is_of_the_image_not_of_the_padded_square():
    """A 640x524 landscape film is padded 58 px above and below to 640x640: its thirds are not the square's."""
    film = square_placement((524, 640))
    for y_img, zone in [(0.31, "upper"), (0.36, "middle"), (0.69, "lower")]:
        y_sq = (y_img * 524 + 58) / 640
        p = peak_location(_peak_at(y_sq, 0.2), film)
        assert p["zone"] == zone and abs(p["y"] - y_img) < 0.01 and p["side"] == "right"
    portrait = square_placement((640, 400))  # padded 120 px left and right: sides are of the image too
    assert peak_location(_peak_at(0.5, 0.46), portrait)["side"] == "right"  # x = 0.44 of the image
    assert peak_location(_peak_at(0.5, 0.46))["side"] == "central"  # no placement: the whole square, as before


def test_a_peak_in_the_padding_has_no_location():
    film = square_placement((524, 640))  # rows above 58/640 and below 582/640 are padding
    assert peak_location(_peak_at(0.02, 0.3), film) is None and peak_location(_peak_at(0.97, 0.7), film) is None
    call = rp.assess({"Effusion": 0.9}, THR, {"Effusion": None})[0]
    assert call.where == "" and "zone" not in rp.render([call])


def test_every_qc_flag_reads_as_a_sentence():
    flags = qc.header_flags(qc.HeaderFacts(modality="CT", body_part="HEAD", view_position="OBL", frames=15,
                                           photometric="RGB"))
    flags += qc.header_flags(qc.HeaderFacts(view_position="LL")) + qc.decode_flags({"exif_orientation": 6})
    flags += qc.pixel_flags((10, 20), np.zeros((32, 32), np.uint8)) + ["possibly_inverted", "auto_inverted"]
    names = {f.partition(":")[0] for f in flags}
    assert {"multi_frame", "colour_converted", "exif_rotated", "not_radiograph", "no_modality", "lateral_view",
            "unusual_view", "low_resolution", "unusual_aspect", "blank_image"} <= names
    for flag in flags:
        text = rp.qc_message(flag)
        assert flag.partition(":")[0] not in text and " " in text, flag  # a sentence, never the raw token
    line = rp.render(rp.assess({"Effusion": 0.9}, THR), ["colour_converted:RGB", "multi_frame:15"]).splitlines()[1]
    assert line == ("INPUT QUALITY: a colour image (photometric RGB) converted to grey before scoring; multi-frame "
                    "DICOM (15 frames): only the first frame was scored.")


@pytest.mark.parametrize("name", ["No Finding", "No_Finding", "no finding"])
def test_no_finding_label_is_never_a_finding(name):
    thr = {name: 0.5, "Effusion": 0.3, "Atelectasis": 0.5}
    both = rp.assess({name: 0.8, "Effusion": 0.9, "Atelectasis": 0.1}, thr)
    for full in (True, False):
        text = rp.render(both, full=full)
        assert "no finding" not in text.lower().replace("no finding above", "")
        assert [ln for ln in text.splitlines() if ln.startswith("IMPRESSION")] == ["IMPRESSION: Effusion."]
    only = rp.assess({name: 0.8, "Effusion": 0.1, "Atelectasis": 0.2}, thr)
    full = rp.render(only, full=True)
    assert "IMPRESSION: No finding above threshold." in full
    assert "No finding above threshold among the 2 labels assessed." in full  # the labels that are findings
    assert f"The model's {name.replace('_', ' ')} label: probability 0.80, operating point 0.50." in full
    assert "label: probability" not in rp.render(only, full=False)
    # below its threshold it is not a near miss or a "below threshold" finding either
    low = rp.render(rp.assess({name: 0.45, "Effusion": 0.9, "Atelectasis": 0.1}, thr), full=True)
    assert name.replace("_", " ").lower() not in low.lower().replace("no finding above", "")


def test_labels_to_explain_calls_first_then_near_then_top():
    labels = [f"L{i}" for i in range(12)]
    thr = {k: 0.5 for k in labels}
    probs = {k: 0.01 for k in labels}
    probs.update({"L3": 0.9, "L7": 0.45, "L1": 0.2, "L2": 0.15})
    assert labels_to_explain(probs, thr) == ["L3", "L7", "L1"]  # call, near miss, then the next most probable
    probs = {k: 0.9 for k in labels}  # every label called: capped
    assert len(labels_to_explain(probs, thr)) == MAX_LABELS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memfd exists on Linux only")
def test_uploads_live_in_memory_files():
    from cxrvit.serve.uploads import memory_path

    with memory_path(b"abc" * 1000) as path:
        assert str(path).startswith("/proc/self/fd/") and path.read_bytes() == b"abc" * 1000
        assert "memfd:" in __import__("os").readlink(path)


def test_cli_predict_report_prints_the_same_template(bundle_dir, tmp_path, capsys):
    from inference_support import factory, run_cli

    cxr = factory.make_dicom(tmp_path / "cxr.dcm")
    ot = factory.make_dicom(tmp_path / "ot.dcm", modality="OT", body_part=None, view=None)
    assert run_cli(["predict", "--model", str(bundle_dir), str(cxr), str(ot), "--out", str(tmp_path / "p.csv"),
                    "--no-progress", "--report", "short"]) == 0
    out = capsys.readouterr().out
    assert out.count("PRELIMINARY REPORT (short form)") == 2 and out.count(rp.DISCLAIMER) == 2
    ot_part = out[out.index("ot.dcm"):]
    # A 64-px image is not upscaled for this small test model, so only the modality is a QC finding.
    assert "INPUT QUALITY: not a projection radiograph (DICOM modality OT)." in ot_part
    assert "zone" in out  # the Grad-CAM peak location is in the text
