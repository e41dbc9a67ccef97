"""Box geometry and the two localisation scores."""
from __future__ import annotations

import numpy as np
import pytest

from cxrvit.data.nih import read_bbox_list
from cxrvit.inference import localization as loc

from inference_support import SHARED


def test_box_follows_the_nih_scale_and_the_model_geometry():
    # NIH 1024-px box on a 512-px copy fed at 64 px: everything scales by 1/16.
    b = loc.box_to_model(160, 320, 320, 160, image_shape=(512, 512), size=64)
    assert (b.x0, b.y0, b.x1, b.y1) == (10, 20, 30, 30)
    # A non-square file is padded to a square first (columns padded by 100 on each side here).
    b = loc.box_to_model(0, 0, 1024, 1024, image_shape=(800, 600), size=80, original_size=1024)
    assert (b.x0, b.x1) == pytest.approx((100 * 0.1, 700 * 0.1)) and (b.y0, b.y1) == pytest.approx((0, 80))


def test_pointing_and_mass():
    box = loc.Box(2, 2, 6, 6)
    heat = np.zeros((10, 10), np.float32)
    heat[3, 4] = 1.0
    assert loc.pointing_hit(heat, box) and loc.mass_in_box(heat, box) == 1.0
    heat[8, 8] = 2.0
    assert not loc.pointing_hit(heat, box) and loc.mass_in_box(heat, box) == pytest.approx(1 / 3)
    uniform = np.ones((10, 10))
    assert loc.mass_in_box(uniform, box) == pytest.approx(box.mask((10, 10)).mean()) == pytest.approx(0.16)
    assert loc.Box(3.2, 3.2, 3.4, 3.4).mask((10, 10)).sum() == 1  # a sub-pixel box keeps one pixel


def test_centre_baseline_points_at_the_centre():
    c = loc.centre_baseline(64)
    assert np.unravel_index(c.argmax(), c.shape) in {(31, 31), (31, 32), (32, 31), (32, 32)}
    assert loc.pointing_hit(c, loc.Box(28, 28, 36, 36)) and not loc.pointing_hit(c, loc.Box(0, 0, 20, 20))


def test_summary_table():
    recs = [loc.LocalizationRecord("a", "Mass", "rollout", True, 0.5, 0.1),
            loc.LocalizationRecord("b", "Mass", "rollout", False, 0.1, 0.3),
            loc.LocalizationRecord("a", "Effusion", "rollout", True, 0.2, 0.2)]
    t = loc.summarize(recs).set_index(["finding", "method"])
    assert t.loc[("Mass", "rollout"), "n"] == 2 and t.loc[("Mass", "rollout"), "pointing"] == 0.5
    assert t.loc[("all", "rollout"), "n"] == 3 and t.loc[("all", "rollout"), "mass_in_box"] == pytest.approx(0.8 / 3)
    md = loc.markdown_table(loc.summarize(recs), ["rollout", "centre"])
    assert md.splitlines()[-1].startswith("| all | 3 |") and "–" in md


def test_bad_box_file_is_named(tmp_path):
    bad = tmp_path / "boxes.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="boxes.csv"):
        read_bbox_list(bad)


def _check_real_box_list(path, n_boxes):
    boxes = read_bbox_list(path)
    assert len(boxes) == n_boxes and list(boxes.columns) == ["image", "finding", "x", "y", "w", "h"]
    assert "Infiltration" in set(boxes.finding) and "Infiltrate" not in set(boxes.finding)
    assert boxes[["x", "y"]].to_numpy().min() >= 0 and (boxes.x + boxes.w).max() <= 1024


@pytest.mark.skipif(not (SHARED / "nih-sample").is_dir(), reason="../shared/data/nih-sample absent")
def test_real_nih_box_list():
    _check_real_box_list(SHARED / "nih-sample" / "BBox_List_2017.csv.gz", 984)   # NIH's box count


def test_the_shipped_box_list_reads_as_nih_s():
    """The repository's own copy (sample/nih-sample: NIH's rows for the sample's images, as NIH wrote them,
    'Infiltrate' included), so a clone without ../shared tests the reader on real rows; its count is read
    from the file's lines, not assumed."""
    import gzip
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "sample" / "nih-sample" / "BBox_List_2017.csv.gz"
    with gzip.open(path, "rt") as fh:
        lines = [line for line in fh.read().splitlines()[1:] if line.strip()]
    assert any(",Infiltrate," in line for line in lines)
    _check_real_box_list(path, len(lines))
