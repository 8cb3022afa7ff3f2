"""Decoding user images robustly: every file becomes an 8-bit RGB image or an :class:`ImageError`.

Training data comes from many tools and cameras, so :func:`load_rgb` accepts what Pillow can decode
and converts it the same way every time:

* **EXIF orientation** is applied (as :func:`PIL.ImageOps.exif_transpose` would), so a portrait
  photo stored sideways with orientation 6 comes out upright; orientations 5-8 swap width and
  height, in :func:`probe_image` too.  The orientation is read from the metadata that precedes the
  pixel data (a PNG ``eXIf`` chunk placed after the image data is ignored by both functions, so
  they always agree; Pillow, exiftool and cameras write it first).
* **Transparent pixels become white**: every image with an alpha channel (RGBA, LA, PA, the
  premultiplied RGBa and La) or with a transparent colour (palette, grey or RGB PNGs with a
  ``tRNS`` entry) is composited over an opaque white background.
* **CMYK** is converted with Pillow's plain CMYK -> RGB formula (embedded ICC profiles are not
  applied).
* **16-bit grey** (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) is scaled to 8 bits, not clipped:
  ``round(v * 255 / 65535)``, so 65535 is white (255) and 32768 is mid grey (128).  Mode ``I``
  (32-bit integers, what Pillow gives for some 16-bit TIFF/PGM files) is read as 16-bit samples
  the same way; values outside [0, 65535] are clipped to it first.
* **Float grey** (``F``) is taken to be on the 0-255 scale: clipped to [0, 255] and rounded
  (NaN becomes 0).
* Black-and-white (``1``) and grey (``L``) images become grey RGB; other modes (YCbCr, LAB, HSV)
  go through Pillow's conversion.

Bad files never raise a traceback: an empty file, a file that is not an image, truncated or
corrupt data (decoding is complete, ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off), an image
over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; also when the caller turned
its ``DecompressionBombWarning`` into an error) or with a zero side all raise :class:`ImageError`
with a one-line reason.

Only the decoders in :data:`DECODER_FORMATS` are used: Pillow's other plugins include some (EPS,
PDF) that run external programs, which must never happen for files from a downloaded dataset.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""File extensions a folder source picks up (compared lower-cased)."""

DECODER_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
"""Pillow decoders tried, in this order (the content decides, not the file name).  ``JPEG`` also
opens the multi-picture JPEGs of cameras, which Pillow then names ``MPO``."""

_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIDE_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_GREY_16_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_TRANSPARENT_COLOUR_MODES = frozenset({"1", "L", "P", "RGB"})


class ImageError(Exception):
    """An image that cannot be used; ``str(err)`` is a one-line user-facing reason (no path in it)."""


@dataclass(frozen=True)
class ImageInfo:
    """What an image file's header says, without decoding the pixels."""

    width: int
    """Width in pixels after applying the EXIF orientation (orientations 5-8 swap the sides)."""
    height: int
    """Height in pixels after applying the EXIF orientation."""
    mode: str
    """Pillow mode of the pixels as stored, e.g. ``"RGB"``, ``"CMYK"``, ``"P"``, ``"I;16"``."""
    format: str
    """Pillow format name, e.g. ``"PNG"``, ``"JPEG"``."""


def probe_image(data: bytes) -> ImageInfo:
    """Read an image's size, mode and format from its header (the pixels are not decoded).

    Args:
        data: The whole file's bytes.

    Raises:
        ImageError: Empty, unidentifiable, over the decompression-bomb limit, or a zero side.
            Corruption in the pixel data is only found by :func:`load_rgb`.
    """
    with _open(data) as image:
        width, height = image.size
        _check_not_empty(width, height)
        if _orientation(image) in _SIDE_SWAPPING_ORIENTATIONS:
            width, height = height, width
        return ImageInfo(width=width, height=height, mode=image.mode, format=image.format or "")


def load_rgb(data: bytes) -> Image.Image:
    """Decode an image completely into an upright 8-bit RGB image (see the module docstring).

    Args:
        data: The whole file's bytes.

    Returns:
        A mode ``"RGB"`` image of size (:attr:`ImageInfo.width`, :attr:`ImageInfo.height`) as
        :func:`probe_image` reports it.

    Raises:
        ImageError: The file cannot be used; ``str(err)`` says why in one line.
    """
    with _open(data) as image:
        orientation = _orientation(image)
        try:
            image.load()
        except Exception as exc:
            raise ImageError(_reason(exc)) from exc
        _check_not_empty(*image.size)
        try:
            rgb = _to_rgb(image)
        except Exception as exc:
            raise ImageError(f"cannot convert image mode {image.mode} to RGB: {_one_line(exc)}") from exc
    method = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    return rgb.transpose(method) if method is not None else rgb


def _open(data: bytes) -> Image.Image:
    """``Image.open`` on in-memory bytes, restricted to :data:`DECODER_FORMATS`; reads the header."""
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        return Image.open(io.BytesIO(data), formats=DECODER_FORMATS)
    except Exception as exc:
        raise ImageError(_reason(exc)) from exc


def _reason(exc: BaseException) -> str:
    """One-line user-facing reason for an exception raised by Pillow while opening or decoding."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"image too large (decompression bomb check): {_one_line(exc)}"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file (cannot identify image format)"
    if isinstance(exc, MemoryError):
        return "not enough memory to decode the image"
    return f"truncated or corrupt image data: {_one_line(exc)}"


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (its type name when the message is empty)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_not_empty(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"image has a zero side ({width}x{height} pixels)")


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) from the metadata read with the header; 1 if absent or unreadable.

    PNG overrides ``getexif`` to decode the whole image in search of a trailing ``eXIf`` chunk;
    the generic implementation used here reads only what ``Image.open`` found, which keeps
    :func:`probe_image` cheap and in agreement with :func:`load_rgb`.  Corrupt EXIF data does not
    make a good image unusable: it counts as orientation 1.
    """
    try:
        value = Image.Image.getexif(image).get(_ORIENTATION_TAG, 1)
        return value if isinstance(value, int) and value in _TRANSPOSE_FOR_ORIENTATION else 1
    except Exception:
        return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to a new 8-bit ``"RGB"`` image (module docstring rules)."""
    mode = image.mode
    if mode in _GREY_16_BIT_MODES:
        samples = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return _grey_to_rgb((samples * 255 + 32767) // 65535)
    if mode == "F":
        samples = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        return _grey_to_rgb(np.rint(np.clip(samples, 0.0, 255.0)))
    if mode == "La":
        image = image.convert("LA")
    if mode in _TRANSPARENT_COLOUR_MODES and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    """[H, W] array of 0-255 values -> grey ``"RGB"`` image."""
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
