"""QC flags from DICOM headers and pixels, and cxrvit dicom-info."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from cxrvit.inference import qc

from inference_support import factory, run_cli as main


def test_header_flags():
    assert qc.header_flags(qc.HeaderFacts("CR", "CHEST", "PA")) == []
    assert qc.header_flags(qc.HeaderFacts("DX", None, None)) == []  # missing fields are not evidence
    assert qc.header_flags(qc.HeaderFacts("OT", None, None)) == ["not_radiograph:OT"]
    assert qc.header_flags(qc.HeaderFacts("CT", "ABDOMEN", "AP")) == ["not_radiograph:CT", "not_chest:ABDOMEN"]
    assert qc.header_flags(qc.HeaderFacts("DX", "CHEST", "LL")) == ["lateral_view"]
    assert qc.header_flags(qc.HeaderFacts("CR", "CHEST", None, "CHEST LAT")) == ["lateral_view"]
    assert qc.header_flags(qc.HeaderFacts(None, "CHEST", "PA")) == ["no_modality"]
    assert qc.header_flags(qc.HeaderFacts("DX", "CHEST", "PA", frames=3)) == ["multi_frame:3"]
    assert qc.header_flags(qc.HeaderFacts("DX", "CHEST", "PA", photometric="RGB")) == ["colour_converted:RGB"]
    assert qc.header_flags(qc.HeaderFacts("DX", "CHEST", "PA", photometric="MONOCHROME1")) == []
    assert qc.header_flags(qc.HeaderFacts("DX", "CHEST", "PA", photometric="PALETTE COLOR")) == []  # refused


def test_pixel_flags():
    real = factory.real_pixels()
    assert qc.pixel_flags((1024, 1024), real) == []
    assert qc.pixel_flags((2000, 1000), real) == ["unusual_aspect:1000x2000"]
    # low resolution is relative to the model's input side (here the 64-px square): only upscaled images
    assert qc.pixel_flags((60, 50), real) == ["low_resolution:50x60<64"]
    assert qc.pixel_flags((64, 40), real) == []  # long side fills the input: downscaled or kept, not upscaled
    assert qc.pixel_flags((100, 120), real) == []
    assert qc.pixel_flags((1024, 1024), np.full((64, 64), 90, np.uint8)) == ["blank_image"]
    assert qc.inversion_score(real) > 1.0
    assert qc.pixel_flags((1024, 1024), 255 - real) == ["possibly_inverted"]


def test_dicom_info(tmp_path, capsys):
    mono1 = factory.make_dicom(tmp_path / "m1.dcm", photometric="MONOCHROME1", view="LL")
    plain = factory.make_dicom(tmp_path / "m2.dcm")
    assert main(["dicom-info", str(plain), "--json", "--preview", str(tmp_path / "p.png")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modality"] == "DX" and info["size"] == "64x64" and info["bits"] == "8/8"
    assert info["spacing"] == "0.8 x 0.8 (PixelSpacing)" and info["transfer_syntax"] == "Explicit VR Little Endian"
    with Image.open(info["preview"]) as im:
        np.testing.assert_array_equal(np.asarray(im), factory.real_pixels())
    # several files, one not DICOM: table output, exit 1, the others still summarised
    (tmp_path / "x.dcm").write_text("nope")
    assert main(["dicom-info", str(mono1), str(tmp_path / "x.dcm")]) == 1
    out = capsys.readouterr().out
    assert "MONOCHROME1" in out and "lateral_view" in out and "error:" in out and "x.dcm" in out


def test_dicom_info_prints_the_header_of_undecodable_objects(capsys):
    from pydicom.data import get_testdata_file

    palette = get_testdata_file("examples_palette.dcm")  # real pseudo-colour object: header yes, pixels refused
    assert main(["dicom-info", palette, "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["photometric"] == "PALETTE COLOR"
    assert info["decode_error"].startswith("colour DICOM refused")
    assert not [f for f in info["qc"] if f.startswith("colour_converted")]  # refused, so nothing was converted
    rgb = get_testdata_file("SC_rgb_rle.dcm")  # a colour secondary capture: read as grey, flagged
    assert main(["dicom-info", rgb, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["qc"][:2] == ["not_radiograph:OT", "colour_converted:RGB"]


def test_dicom_info_previews_of_files_with_one_name_do_not_overwrite_each_other(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = factory.make_dicom(tmp_path / "a" / "x.dcm")
    negative = factory.make_dicom(tmp_path / "b" / "x.dcm", photometric="MONOCHROME1")
    assert main(["dicom-info", str(plain), str(negative), "--json", "--preview", str(tmp_path / "p.png")]) == 0
    first, second = json.loads(capsys.readouterr().out)
    assert first["preview"] != second["preview"]
    with Image.open(first["preview"]) as one, Image.open(second["preview"]) as two:
        np.testing.assert_array_equal(np.asarray(one), factory.real_pixels())
        np.testing.assert_array_equal(np.asarray(two), 255 - factory.real_pixels())


def test_dicom_info_refuses_a_preview_name_it_cannot_write_before_reading_anything(tmp_path, capsys):
    plain = factory.make_dicom(tmp_path / "x.dcm")
    for preview in (tmp_path / "preview", tmp_path / "p.xyz"):  # no extension (e.g. a folder), an unknown one
        assert main(["dicom-info", str(plain), "--preview", str(preview)]) == 2
        err = capsys.readouterr().err
        assert str(preview) in err and "image file name" in err


def test_dicom_info_table_shows_a_malformed_header_value(tmp_path, capsys):
    # A PixelSpacing that is not a number used to show as "-", like a file without one; only --json said why.
    path = factory.make_dicom(tmp_path / "x.dcm")
    raw = path.read_bytes()
    assert raw.count(b"0.8\\0.8 ") == 1
    path.write_bytes(raw.replace(b"0.8\\0.8 ", b"0.8\\abc "))
    assert main(["dicom-info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PixelSpacing '0.8\\abc' is not a number" in out


def test_dicom_info_on_a_folder_says_it_is_a_folder(tmp_path, capsys):
    assert main(["dicom-info", str(tmp_path)]) == 1  # was "no such file" for a folder that exists
    out = capsys.readouterr().out
    assert f"{tmp_path}: is a folder" in out and "no such file" not in out
