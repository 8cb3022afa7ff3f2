"""Decoding user images: every mode becomes upright 8-bit RGB, every bad file a one-line ImageError."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps, features

from flowtune.data.images import SUPPORTED_EXTENSIONS, ImageError, ImageInfo, load_rgb, probe_image


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pattern(width: int, height: int) -> Image.Image:
    """An RGB image in which every pixel differs from its neighbours (to check orientation)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 7 % 256, y * 11 % 256, (x * 3 + y * 5) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def reason_of(data: bytes, function=load_rgb) -> str:
    with pytest.raises(ImageError) as info:
        function(data)
    reason = str(info.value)
    assert "\n" not in reason and reason
    return reason


def test_supported_extensions_are_lower_case_with_dots():
    assert SUPPORTED_EXTENSIONS == (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP"])
def test_lossless_rgb_round_trip(fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    source = pattern(37, 23)
    data = encode(source, fmt, lossless=True) if fmt == "WEBP" else encode(source, fmt)
    assert probe_image(data) == ImageInfo(width=37, height=23, mode="RGB", format=fmt)
    image = load_rgb(data)
    assert image.mode == "RGB" and image.size == (37, 23)
    np.testing.assert_array_equal(pixels(image), pixels(source))


def test_jpeg_loads_close_to_source():
    source = Image.new("RGB", (40, 30), (200, 100, 50))
    image = load_rgb(encode(source, "JPEG", quality=95))
    assert image.mode == "RGB" and image.size == (40, 30)
    assert np.abs(pixels(image) - [200, 100, 50]).max() <= 3


def test_empty_file():
    assert reason_of(b"") == "empty file (0 bytes)"
    assert reason_of(b"", probe_image) == "empty file (0 bytes)"


def test_text_file_is_not_an_image():
    data = b"this is a caption, not a picture\n" * 4
    assert reason_of(data) == "not an image file (cannot identify image format)"
    assert reason_of(data, probe_image) == "not an image file (cannot identify image format)"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_fails_on_load_not_on_probe(fmt):
    data = encode(pattern(64, 64), fmt)
    truncated = data[: len(data) // 2]
    assert probe_image(truncated).width == 64  # the header is intact
    assert reason_of(truncated).startswith("truncated or corrupt image data: ")


def test_garbage_after_a_valid_header_is_corrupt():
    data = bytearray(encode(pattern(64, 64), "PNG"))
    data[60:-12] = bytes(len(data) - 72)  # zero the compressed pixels (and their checksum)
    assert reason_of(bytes(data)).startswith("truncated or corrupt image data: ")


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (with a valid chunk checksum)."""
    data = bytearray(encode(Image.new("RGB", (4, 4)), "PNG"))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def test_zero_sized_image_is_rejected():
    for function in (probe_image, load_rgb):
        reason_of(png_with_size(0, 4), function)


def test_decompression_bomb_is_rejected(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # errors above 2 x 100 pixels
    data = encode(Image.new("RGB", (30, 30)), "PNG")
    for function in (probe_image, load_rgb):
        assert reason_of(data, function).startswith("image too large (decompression bomb check): ")


def test_decompression_bomb_warning_turned_into_an_error_is_an_image_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # 900 pixels: a warning, not an error
    data = encode(Image.new("RGB", (30, 30)), "PNG")
    with pytest.warns(Image.DecompressionBombWarning):
        assert load_rgb(data).size == (30, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert reason_of(data).startswith("image too large (decompression bomb check): ")


def test_formats_that_run_external_programs_are_not_decoded():
    data = encode(Image.new("RGB", (8, 8)), "EPS")  # Pillow decodes EPS with Ghostscript
    assert reason_of(data) == "not an image file (cannot identify image format)"


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (24, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # red ink
    assert probe_image(data).mode == "CMYK"
    image = load_rgb(data)
    assert image.mode == "RGB" and image.size == (24, 16)
    assert np.abs(pixels(image) - [255, 0, 0]).max() <= 3


def palette_image(transparent_index: int | None) -> bytes:
    image = Image.new("P", (4, 2))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)  # 0 = red, 1 = blue
    image.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    options = {} if transparent_index is None else {"transparency": transparent_index}
    return encode(image, "PNG", **options)


def test_palette_png_without_transparency_keeps_its_colours():
    data = palette_image(None)
    assert probe_image(data).mode == "P"
    image = pixels(load_rgb(data))
    assert image[0, 0].tolist() == [255, 0, 0] and image[0, 1].tolist() == [0, 0, 255]


def test_palette_png_transparent_colour_becomes_white():
    image = pixels(load_rgb(palette_image(transparent_index=1)))
    assert image[0, 0].tolist() == [255, 0, 0]  # opaque red stays red
    assert image[0, 1].tolist() == [255, 255, 255]  # transparent blue becomes white


def test_rgb_png_with_a_transparent_colour_becomes_white():
    image = Image.new("RGB", (2, 1), (0, 0, 0))
    image.putpixel((1, 0), (10, 20, 30))
    loaded = pixels(load_rgb(encode(image, "PNG", transparency=(0, 0, 0))))
    assert loaded[0].tolist() == [[255, 255, 255], [10, 20, 30]]


def test_16_bit_grey_png_is_scaled_not_clipped():
    samples = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(samples), "PNG")
    assert probe_image(data).mode == "I;16"
    image = pixels(load_rgb(data))
    assert image[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()


def test_32_bit_integer_grey_is_read_as_16_bit_and_clipped():
    samples = np.array([[-5, 0, 32768, 65535, 70000]], dtype=np.int32)
    data = encode(Image.fromarray(samples), "TIFF")
    assert probe_image(data).mode == "I"
    assert pixels(load_rgb(data))[0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_float_grey_is_clipped_to_0_255():
    samples = np.array([[-3.0, 100.4, 100.6, 300.0, np.nan]], dtype=np.float32)
    data = encode(Image.fromarray(samples), "TIFF")
    assert probe_image(data).mode == "F"
    assert pixels(load_rgb(data))[0, :, 0].tolist() == [0, 100, 101, 255, 0]


@pytest.mark.parametrize("mode", ["1", "L"])
def test_black_and_white_and_grey_become_grey_rgb(mode):
    image = Image.new(mode, (3, 1), 0)
    image.putpixel((1, 0), 255 if mode == "L" else 1)
    loaded = load_rgb(encode(image, "PNG"))
    assert loaded.mode == "RGB"
    assert pixels(loaded)[0].tolist() == [[0, 0, 0], [255, 255, 255], [0, 0, 0]]


def test_rgba_transparent_pixels_become_white():
    image = Image.new("RGBA", (3, 1))
    image.putdata([(10, 20, 30, 255), (10, 20, 30, 0), (0, 0, 0, 128)])
    data = encode(image, "PNG")
    assert probe_image(data).mode == "RGBA"
    loaded = pixels(load_rgb(data))
    assert loaded[0, 0].tolist() == [10, 20, 30]  # opaque: unchanged
    assert loaded[0, 1].tolist() == [255, 255, 255]  # fully transparent: white
    assert np.abs(loaded[0, 2] - 127).max() <= 1  # half-transparent black over white: mid grey


def test_grey_with_alpha_transparent_pixels_become_white():
    image = Image.new("LA", (2, 1))
    image.putdata([(40, 255), (40, 0)])
    data = encode(image, "PNG")
    assert probe_image(data).mode == "LA"
    assert pixels(load_rgb(data))[0].tolist() == [[40, 40, 40], [255, 255, 255]]


def with_orientation(image: Image.Image, orientation: int, fmt: str, **options: object) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif, **options)


def test_exif_orientation_6_swaps_width_and_height_in_jpeg():
    data = with_orientation(pattern(40, 20), 6, "JPEG", quality=95)
    assert probe_image(data) == ImageInfo(width=20, height=40, mode="RGB", format="JPEG")
    image = load_rgb(data)
    assert image.size == (20, 40)
    expected = pattern(40, 20).transpose(Image.Transpose.ROTATE_270)
    assert np.abs(pixels(image) - pixels(expected)).mean() < 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_exif_transpose(orientation):
    data = with_orientation(pattern(9, 5), orientation, "PNG")
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    image = load_rgb(data)
    assert image.size == expected.size
    assert (probe_image(data).width, probe_image(data).height) == expected.size
    np.testing.assert_array_equal(pixels(image), pixels(expected))


def test_invalid_exif_orientation_is_ignored():
    data = with_orientation(pattern(9, 5), 9, "PNG")
    assert probe_image(data).width == 9
    np.testing.assert_array_equal(pixels(load_rgb(data)), pixels(pattern(9, 5)))
