import io

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ImageError
from pipeline.images.decode import decode_image
from tests.conftest import reencode


def test_real_jpeg_decodes_to_square_uint8(sample_images):
    out = decode_image(sample_images[0].read_bytes(), 160)
    assert out.shape == (160, 160, 3) and out.dtype == np.uint8
    assert out.std() > 10  # a real photo, not a blank


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA"])
def test_modes_become_rgb(sample_images, mode):
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    out = decode_image(reencode(sample_images[1], fmt=fmt, mode=mode), 96)
    assert out.shape == (96, 96, 3)
    reference = decode_image(reencode(sample_images[1], fmt="PNG"), 96).astype(int)
    # Same picture after conversion: far closer to the original than to a flat image.
    assert np.abs(out.astype(int) - reference).mean() < 40


def test_transparent_pixels_become_white():
    im = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    out = decode_image(buf.getvalue(), 32)
    assert (out == 255).all()


def test_sixteen_bit_png_scales_to_eight_bits():
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    out = decode_image(buf.getvalue(), 64)
    assert out.min() <= 2 and out.max() >= 250


def test_exif_orientation_is_applied(sample_images):
    src = Image.open(sample_images[2]).convert("RGB")
    upright = src.crop((0, 0, src.width, src.height // 2))  # landscape: 348 x 174
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif, quality=95)
    expected_buf = io.BytesIO()
    stored.transpose(Image.Transpose.ROTATE_270).save(expected_buf, "JPEG", quality=95)
    out = decode_image(buf.getvalue(), 64).astype(int)
    expected = decode_image(expected_buf.getvalue(), 64).astype(int)
    unrotated = decode_image(_plain(stored), 64).astype(int)
    assert np.abs(out - expected).mean() < np.abs(out - unrotated).mean()
    assert np.abs(out - expected).mean() < 8


def _plain(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_large_jpeg_uses_draft_mode_and_matches(sample_images):
    big = reencode(sample_images[3], size=1600, quality=90)
    out = decode_image(big, 128)
    small = decode_image(reencode(sample_images[3], size=348, quality=90), 128)
    assert out.shape == (128, 128, 3)
    assert np.abs(out.astype(int) - small.astype(int)).mean() < 12


@pytest.mark.parametrize(("data", "error_type"), [
    (b"definitely not an image", "not_an_image"),
    (b"", "not_an_image"),
])
def test_garbage_is_a_typed_error(data, error_type):
    with pytest.raises(ImageError) as info:
        decode_image(data, 64)
    assert info.value.error_type == error_type


def test_truncated_jpeg_is_a_typed_error(sample_images):
    data = sample_images[4].read_bytes()
    with pytest.raises(ImageError) as info:
        decode_image(data[: len(data) // 2], 64)
    assert info.value.error_type == "truncated"


def test_pixel_limit(sample_images):
    with pytest.raises(ImageError) as info:
        decode_image(sample_images[0].read_bytes(), 64, max_pixels=1000)
    assert info.value.error_type == "too_large"
