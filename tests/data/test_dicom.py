"""The DICOM reader: transfer syntaxes, the grey-scale display chain, refusals, header summary."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless,
                         RLELossless)

from cxrvit.data import images
from cxrvit.data.dicom import decode_dicom, read_header, sniff_dicom
from cxrvit.data.images import ImageReadError

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("dicom_factory", ROOT / "tests/fixtures/dicom/factory.py")
factory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(factory)
make_dicom, real_pixels = factory.make_dicom, factory.real_pixels

SHARED = ROOT.parent / "shared" / "data" / "dicom"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/dicom (real DICOM files) absent")


# -- encodings: every one must give back exactly the stored pixels ------------------------------

@pytest.mark.parametrize("kwargs", [
    {},                                        # explicit VR little endian, Part 10
    {"implicit": True},                        # implicit VR (the NIH DICOM copy)
    {"implicit": True, "preamble": False},     # bare implicit dataset: no preamble, no DICM
    {"preamble": False},                       # bare explicit dataset
    {"compress": RLELossless},
    {"compress": JPEG2000Lossless},
], ids=["explicit", "implicit", "bare-implicit", "bare-explicit", "rle", "jpeg2000"])
def test_encodings_decode_to_the_stored_pixels(tmp_path, kwargs):
    path = make_dicom(tmp_path / "x.dcm", **kwargs)
    out = images.read_grey(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, real_pixels())


def test_compressed_decoders_are_installed():
    # JPEG Lossless/JPEG-LS cannot be *written* here (no encoder), so check the decoders exist.
    for uid in (JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless):
        assert pydicom.pixels.get_decoder(uid).is_available, uid.name


def test_jpeg_ls_matches_its_uncompressed_twin():
    # pydicom's own real MR pair: the same pixels stored JPEG-LS lossless and uncompressed.
    from pydicom.data import get_testdata_file
    plain, jls = get_testdata_file("MR_small.dcm"), get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    np.testing.assert_allclose(decode_dicom(jls), decode_dicom(plain))


# -- the display chain ---------------------------------------------------------------------------

def test_bits_above_bits_stored_are_ignored(tmp_path):
    stored = real_pixels().astype(np.uint16) * 16  # 12-bit values
    path = make_dicom(tmp_path / "x.dcm", stored, bits_stored=12, high_bits_junk=True)
    out = decode_dicom(path)
    assert out.max() < 4096
    np.testing.assert_array_equal(out, stored)


def test_modality_lut_is_applied(tmp_path):
    stored = real_pixels().astype(np.int16) * 4 - 500
    path = make_dicom(tmp_path / "x.dcm", stored, bits_stored=16, signed=True, slope=2.0, intercept=-1024.0)
    out = decode_dicom(path)
    np.testing.assert_allclose(out, stored.astype(np.float32) * 2 - 1024)


def test_window_clips_outside_the_window(tmp_path):
    stored = real_pixels().astype(np.uint16) * 16
    centre, width = 2000.0, 1000.0
    path = make_dicom(tmp_path / "x.dcm", stored, bits_stored=12, window=(centre, width))
    out = decode_dicom(path)
    below, above = stored < centre - width / 2, stored > centre + width / 2
    assert below.any() and above.any()
    assert np.all(out[below] == out.min()) and np.all(out[above] == out.max())
    inside = ~below & ~above
    order = np.argsort(stored[inside], kind="stable")
    assert np.all(np.diff(out[inside][order]) >= 0)  # monotonic inside the window


def test_monochrome1_is_inverted(tmp_path):
    stored = real_pixels().astype(np.uint16) * 16
    m2 = decode_dicom(make_dicom(tmp_path / "m2.dcm", stored, bits_stored=12))
    m1 = decode_dicom(make_dicom(tmp_path / "m1.dcm", stored, bits_stored=12, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(m1.astype(np.int32), 4095 - m2.astype(np.int32))
    # ... also after a window, where the inversion happens on the windowed values.
    w2 = decode_dicom(make_dicom(tmp_path / "w2.dcm", stored, bits_stored=12, window=(2000, 3000)))
    w1 = decode_dicom(make_dicom(tmp_path / "w1.dcm", stored, bits_stored=12, window=(2000, 3000),
                                 photometric="MONOCHROME1"))
    u1, u2 = images.to_uint8(w1).astype(int), images.to_uint8(w2).astype(int)
    assert np.abs(u1 - (255 - u2)).max() <= 1


# -- refusals --------------------------------------------------------------------------------------

def test_multiframe_reads_the_first_frame(tmp_path):
    pixels = real_pixels()
    path = make_dicom(tmp_path / "x.dcm", pixels=np.stack([pixels, 255 - pixels]), frames=2)
    np.testing.assert_array_equal(images.read_grey(path), pixels)
    assert read_header(path).frames == 2  # QC flags multi_frame:2 from the header


def test_rgb_and_ybr_become_grey_luma_palette_is_refused():
    from pydicom.data import get_testdata_file

    rgb = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm")).pixel_array.astype(np.float32)
    grey = decode_dicom(get_testdata_file("SC_rgb_rle.dcm"))
    assert grey.shape == rgb.shape[:2] and grey.dtype == np.uint8
    np.testing.assert_array_equal(grey, np.rint(rgb @ np.float32([0.299, 0.587, 0.114])).astype(np.uint8))
    # the same picture stored as YBR_FULL (lossy JPEG, dcmtk) decodes to the same grey up to JPEG's
    # ringing at the colour bars' edges
    diff = np.abs(decode_dicom(get_testdata_file("SC_rgb_dcmtk_+eb+cy+n1.dcm")).astype(int) - grey.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 10
    with pytest.raises(ImageReadError, match="colour DICOM refused.*PALETTE COLOR.*rendering"):
        decode_dicom(get_testdata_file("examples_palette.dcm"))


def test_big_endian_dataset_without_file_meta_is_sniffed():
    from pydicom.data import get_testdata_file

    from cxrvit.data.dicom import is_dicom_file

    assert is_dicom_file(get_testdata_file("ExplVR_BigEndNoMeta.dcm"))
    with pytest.raises(ImageReadError, match="no pixel data"):  # an RT plan: recognised, then refused
        images.read_grey(get_testdata_file("ExplVR_BigEndNoMeta.dcm"))


def test_truncated_file_names_the_file(tmp_path):
    good = make_dicom(tmp_path / "good.dcm")
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageReadError) as err:
        images.read_grey(bad)
    assert "bad.dcm" in str(err.value)


def test_an_image_object_cut_before_its_pixel_data_is_called_truncated(tmp_path):
    # Cut at an element boundary before (7FE0,0010): pydicom reads a complete-looking header with no pixels, which
    # was reported as an object without pixel data, as if it were an RT plan.
    good = make_dicom(tmp_path / "good.dcm")
    data = good.read_bytes()
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(data[:data.rindex(b"\xe0\x7f\x10\x00")])   # the PixelData tag, little endian
    with pytest.raises(ImageReadError, match=r"bad\.dcm: DICOM object has no pixel data although its class "
                                             r"\(.*Image Storage\) requires them.*probably truncated"):
        images.read_grey(bad)


@pytest.mark.parametrize("compress", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_truncated_compressed_pixel_data_is_called_truncated(tmp_path, compress):
    # A copy cut off inside encapsulated pixel data: pydicom only warns and returns an empty dataset, which
    # was reported as "no pixel data (unknown SOP class)" -- the wrong problem for a half-copied file.
    good = make_dicom(tmp_path / "good.dcm", compress=compress)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ImageReadError, match=r"bad\.dcm: truncated DICOM file") as err:
        images.read_grey(bad)
    assert "no pixel data" not in str(err.value)
    assert read_header(bad).rows == 64  # the header before the pixel data is still summarised


def test_sniffing_ignores_extensions(tmp_path):
    path = make_dicom(tmp_path / "scan.png")  # lying extension
    assert images.sniff_format(path) == "dicom"
    assert not sniff_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    assert not sniff_dicom(b"hello world, not a dicom file at all" * 4)


def test_header_summary(tmp_path):
    h = read_header(make_dicom(tmp_path / "x.dcm", compress=RLELossless, view="AP"))
    assert (h.modality, h.body_part, h.view_position, h.sex, h.age) == ("DX", "CHEST", "AP", "F", "054Y")
    assert (h.rows, h.columns, h.bits_stored, h.photometric) == (64, 64, 8, "MONOCHROME2")
    assert h.pixel_spacing == [0.8, 0.8] and h.transfer_syntax == "RLE Lossless"


# -- the four real files ------------------------------------------------------------------------

@needs_shared
def test_real_jpeg_baseline_cr():
    path = SHARED / "siim-cr-chest-pa-jpeg-baseline.dcm"
    out = images.read_grey(path)
    assert out.shape == (1024, 1024) and out.dtype == np.uint8
    h = read_header(path)
    assert (h.modality, h.body_part, h.view_position, h.pixel_spacing) == ("CR", "CHEST", "PA", [0.168, 0.168])
    assert h.transfer_syntax == "JPEG Baseline (Process 1)"


@needs_shared
def test_real_mislabelled_monochrome1_is_the_exact_negative():
    # The mislabelled file stores the original's byte-identical (MONOCHROME2) pixel data tagged
    # MONOCHROME1, so a correct reader returns the negative: 255 - original, pixel for pixel.
    original = images.read_grey(SHARED / "siim-cr-chest-pa-jpeg-baseline.dcm").astype(np.int32)
    mislabelled = images.read_grey(SHARED / "siim-cr-chest-pa-monochrome1.dcm").astype(np.int32)
    np.testing.assert_array_equal(mislabelled, 255 - original)


@needs_shared
def test_real_true_monochrome1_decodes_to_the_original():
    # The true twin stores 255 - v, uncompressed, tagged MONOCHROME1: the display chain's inversion
    # must give back exactly the JPEG-baseline original's decoded pixels.
    original = images.read_grey(SHARED / "siim-cr-chest-pa-jpeg-baseline.dcm")
    true_m1 = images.read_grey(SHARED / "siim-cr-chest-pa-true-monochrome1.dcm")
    h = read_header(SHARED / "siim-cr-chest-pa-true-monochrome1.dcm")
    assert (h.photometric, h.transfer_syntax) == ("MONOCHROME1", "Explicit VR Little Endian")
    assert true_m1.dtype == original.dtype == np.uint8
    np.testing.assert_array_equal(true_m1, original)


@needs_shared
def test_real_implicit_vr_dx_and_ot():
    dx = images.read_grey(SHARED / "nih-dx-implicit-vr.dcm")
    assert dx.shape == (1024, 1024)
    assert read_header(SHARED / "nih-dx-implicit-vr.dcm").transfer_syntax == "Implicit VR Little Endian"
    assert images.read_grey(SHARED / "not-a-cxr-ot.dcm").shape == (512, 512)
    assert read_header(SHARED / "not-a-cxr-ot.dcm").modality == "OT"


# -- header glitches: noted in the summary, never a crash without the file's name ----------------

def _glitched(path: Path, old: bytes, new: bytes, **kwargs) -> Path:
    """A fixture file whose header value ``old`` is overwritten in place by ``new`` (same length, so the
    element lengths stay right): pydicom refuses to *write* such values, real archives hold them."""
    make_dicom(path, **kwargs)
    raw = path.read_bytes()
    assert raw.count(old) == 1 and len(old) == len(new)
    path.write_bytes(raw.replace(old, new))
    return path


def test_malformed_header_values_are_noted_not_fatal(tmp_path):
    one = read_header(_glitched(tmp_path / "one.dcm", b"0.8\\0.8 ", b"0.168   "))
    assert one.pixel_spacing == [0.168] and one.spacing_source == "PixelSpacing"
    assert one.header_problems == ["PixelSpacing has 1 value(s), expected 2"]
    text = read_header(_glitched(tmp_path / "text.dcm", b"0.8\\0.8 ", b"0.8\\abc "))
    assert text.pixel_spacing is None and text.header_problems == ["PixelSpacing '0.8\\abc' is not a number"]
    slope = read_header(_glitched(tmp_path / "slope.dcm", b"9.99", b"abc ", slope=9.99, intercept=0.0))
    assert slope.rescale is None and slope.header_problems == ["RescaleSlope 'abc' is not a number"]
    assert slope.pixel_spacing == [0.8, 0.8] and slope.modality == "DX"  # the rest of the summary is intact
    assert read_header(make_dicom(tmp_path / "ok.dcm", slope=2.0, intercept=-1.0)).header_problems == []


def test_a_non_numeric_rescale_or_window_names_the_tag(tmp_path):
    # Decoding needs these values: refused naming the tag and the value, not with Python's "unsupported operand
    # type(s) for -=: 'str' and 'float'" from inside pydicom's windowing.
    slope = _glitched(tmp_path / "slope.dcm", b"9.99", b"abc ", slope=9.99, intercept=0.0)
    with pytest.raises(ImageReadError, match=r"slope\.dcm: RescaleSlope 'abc' is not a number"):
        images.read_grey(slope)
    stored = real_pixels().astype(np.uint16) * 16
    window = _glitched(tmp_path / "window.dcm", b"1234.5", b"abcdef", pixels=stored, bits_stored=12,
                       window=(1234.5, 1000.0))
    with pytest.raises(ImageReadError, match=r"window\.dcm: WindowCenter 'abcdef' is not a number"):
        images.read_grey(window)


def test_unexpected_header_failure_names_the_file(tmp_path, monkeypatch):
    from cxrvit.data import dicom

    path = make_dicom(tmp_path / "x.dcm")

    def broken(ds, keyword):  # stands for any pydicom failure on a value the summary reads
        raise TypeError("simulated pydicom failure")

    monkeypatch.setattr(dicom, "_text", broken)
    with pytest.raises(ImageReadError, match=r"x\.dcm: unreadable DICOM header \(TypeError: simulated"):
        read_header(path)


def test_dicom_info_reports_every_file_despite_a_glitched_header(tmp_path, capsys):
    import json

    from cxrvit.cli import main

    glitched = _glitched(tmp_path / "text.dcm", b"0.8\\0.8 ", b"0.8\\abc ")
    good = make_dicom(tmp_path / "good.dcm")
    assert main(["dicom-info", str(glitched), str(good), "--json"]) == 0
    first, second = json.loads(capsys.readouterr().out)
    assert first["path"] == str(glitched) and first["header_problems"] == ["PixelSpacing '0.8\\abc' is not a number"]
    assert second["path"] == str(good) and second["spacing"] == "0.8 x 0.8 (PixelSpacing)"


def test_colour_dicom_ignores_its_window(tmp_path):
    # DICOM PS3.3 C.11.2: VOI LUTs (windows) apply to grey images only; a colour secondary capture that carries
    # one (copied from its grey original) is still read, as the same grey as without the window.
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 20  # a narrow window: applied, it would clip most of the picture
    ds.save_as(tmp_path / "rgb_window.dcm")
    expected = decode_dicom(get_testdata_file("SC_rgb_rle.dcm"))
    np.testing.assert_array_equal(images.read_grey(tmp_path / "rgb_window.dcm"), expected)
    assert read_header(tmp_path / "rgb_window.dcm").has_window  # the summary still says the file has one
