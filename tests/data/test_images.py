"""``data/images.py``: EXIF orientation, where an image lies in its square, the pixel-limit error."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cxrvit.data import images

#: EXIF orientation -> the transpose that stores an upright picture so that a viewer applying the tag
#: shows it upright again (the inverse of what the tag asks a viewer to do).
STORE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_270}


@pytest.fixture
def upright(dicom_factory) -> Image.Image:
    """A real NIH radiograph, made non-square so that a turn changes its shape."""
    return Image.fromarray(dicom_factory.real_pixels()[:, 8:56].copy())


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = orientation
    return exif


@pytest.mark.parametrize("orientation", sorted(STORE))
def test_png_stored_turned_is_read_upright(upright, tmp_path, orientation):
    path = tmp_path / "x.png"
    upright.transpose(STORE[orientation]).save(path, exif=_exif(orientation))
    arr, info = images.read_grey_info(path)
    assert info == {"exif_orientation": orientation}
    assert np.array_equal(arr, np.asarray(upright))  # lossless: exactly the upright picture
    assert np.array_equal(images.read_grey(path), arr)


def test_jpeg_stored_sideways_is_read_as_viewers_show_it(upright, tmp_path):
    upright.save(tmp_path / "upright.jpg", quality=95)
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "exif6.jpg", quality=95, exif=_exif(6))
    a = images.read_grey(tmp_path / "upright.jpg").astype(int)
    arr, info = images.read_grey_info(tmp_path / "exif6.jpg")
    assert info["exif_orientation"] == 6 and arr.shape == a.shape and np.abs(arr - a).mean() < 3


def test_no_or_plain_orientation_changes_nothing(upright, tmp_path):
    upright.save(tmp_path / "plain.png")
    upright.save(tmp_path / "one.jpg", exif=_exif(1))
    upright.save(tmp_path / "bogus.png", exif=_exif(42))  # out of range: ignored, as viewers do
    for name in ("plain.png", "bogus.png"):
        arr, info = images.read_grey_info(tmp_path / name)
        assert info == {"exif_orientation": 1} and np.array_equal(arr, np.asarray(upright))
    assert images.read_grey_info(tmp_path / "one.jpg")[1] == {"exif_orientation": 1}


def test_square_placement_is_where_pad_to_square_puts_the_image():
    for shape in [(524, 640), (640, 524), (7, 7), (3, 10)]:
        arr = np.full(shape, 200, np.uint8)
        arr[0, 0] = 10  # the image minimum: what the padding is filled with
        sq = images.pad_to_square(arr)
        top, left, bottom, right = images.square_placement(shape)
        side = sq.shape[0]
        rows, cols = np.nonzero(sq == 200)
        assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == (
            round(top * side), round(left * side), round(bottom * side), round(right * side))
    assert images.square_placement((524, 640)) == (58 / 640, 0.0, 582 / 640, 1.0)


def test_pixel_limit_error_is_a_read_error_that_names_its_limit(tmp_path):
    err = images.PixelLimitError(tmp_path / "x.png", "too many", 1000)
    assert isinstance(err, images.ImageReadError) and err.limit == 1000 and str(err).endswith("x.png: too many")



def _png_header_only(path, width: int, height: int):
    """A grey PNG with its IHDR and IEND chunks and no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_an_image_over_the_pixel_limit_is_refused_from_its_header_before_decoding(tmp_path):
    # 20000 x 20000 pixels is 1.5x the limit, under Pillow's own refusal at 2x: such a file was decoded in full
    # before it was refused (here, with no pixel data, the decode fails as "truncated" instead).
    path = _png_header_only(tmp_path / "huge.png", 20000, 20000)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(images.PixelLimitError, match="20000x20000"):
        images.read_grey(path)
