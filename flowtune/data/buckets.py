"""Aspect-ratio buckets: train every image at about the same pixel count, in its own shape.

A resolution ``R`` defines a set of buckets (``W x H`` sizes, multiples of the family's granularity,
with ``W * H`` near ``R**2``).  Each image goes to the bucket whose aspect ratio is nearest to its
own, is scaled so that it covers the bucket, and is centre-cropped to it; batches are drawn from one
bucket at a time so every tensor in a batch has the same shape.

The crop is planned in the source image's pixel coordinates (:class:`CropPlan`) and carried out by
one Lanczos resample of exactly that region (:func:`apply_crop`), which gives the same pixels as
Pillow's ``ImageOps.fit(image, size, Image.Resampling.LANCZOS)``.

Video families bucket clips the same way, by the size of their frames; a :class:`FrameBucket`
adds the clip's frame count (1 for a still image), so that a batch never mixes clip lengths.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass(frozen=True, order=True)
class Bucket:
    """A training image size in pixels."""

    width: int
    """Width in pixels, a multiple of the granularity."""
    height: int
    """Height in pixels, a multiple of the granularity."""

    @property
    def aspect(self) -> float:
        """``width / height``."""
        return self.width / self.height

    @property
    def area(self) -> int:
        """``width * height`` in pixels."""
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True, order=True)
class FrameBucket:
    """A training clip shape of a video family: frames of one bucket size."""

    frames: int
    """Frames per clip (1 for a still image)."""
    width: int
    """Width in pixels."""
    height: int
    """Height in pixels."""

    @classmethod
    def of(cls, bucket: Bucket, frames: int) -> FrameBucket:
        """``bucket``'s size with ``frames`` frames."""
        return cls(frames, bucket.width, bucket.height)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}f"


def default_bucket_step(resolution: int, granularity: int) -> int:
    """``resolution / 16`` rounded down to a multiple of ``granularity`` (at least ``granularity``):
    64 px at 1024, 32 px at 512, so that neighbouring buckets differ by about 6% in aspect."""
    return max(granularity, resolution // 16 // granularity * granularity)


def make_buckets(
    resolution: int, granularity: int, max_aspect: float = 4.0, step: int | None = None
) -> list[Bucket]:
    """Buckets whose area is near ``resolution**2``, for both orientations.

    For every side length ``s`` that is a multiple of ``step``, the other side is the
    multiple of ``granularity`` that brings the area nearest to ``resolution**2`` (on a tie, the
    squarer one); both ``s x other`` and ``other x s`` are buckets when their aspect ratio lies in
    ``[1 / max_aspect, max_aspect]``.  Taking both orientations of every pair makes the set
    symmetric: ``H x W`` is a bucket whenever ``W x H`` is.

    Args:
        resolution: Side of the square bucket in pixels; a multiple of ``granularity``.
        granularity: Every bucket side is a multiple of it (e.g. 16 for FLUX.1: VAE factor 8 x
            2x2 patches).
        max_aspect: Most elongated aspect ratio allowed (>= 1).
        step: Spacing of the enumerated side lengths, a multiple of ``granularity``; None =
            :func:`default_bucket_step`.  Finer steps make more, nearly identical buckets, which
            spreads a small dataset thin.

    Returns:
        Distinct buckets sorted by aspect ratio (tallest first); always contains
        ``Bucket(resolution, resolution)``.

    Raises:
        ValueError: A non-positive argument, ``max_aspect < 1``, or a resolution that is not a
            multiple of the granularity.
    """
    if resolution <= 0 or granularity <= 0:
        raise ValueError(f"resolution ({resolution}) and granularity ({granularity}) must be positive")
    if resolution % granularity != 0:
        raise ValueError(f"resolution {resolution} is not a multiple of the granularity {granularity}")
    if not max_aspect >= 1.0:
        raise ValueError(f"max_aspect must be at least 1, got {max_aspect}")
    step = default_bucket_step(resolution, granularity) if step is None else step
    if step <= 0 or step % granularity != 0:
        raise ValueError(f"bucket step {step} is not a positive multiple of the granularity {granularity}")
    target = resolution * resolution
    tolerance = 1e-9
    longest = math.isqrt(int(target * max_aspect)) + 2 * granularity
    buckets: set[Bucket] = {Bucket(resolution, resolution)}
    for side in range(step, longest + 1, step):
        other = _nearest_area_side(side, target, granularity)
        if 1.0 / max_aspect - tolerance <= side / other <= max_aspect + tolerance:
            buckets.add(Bucket(side, other))
            buckets.add(Bucket(other, side))
    return sorted(buckets, key=lambda b: (b.aspect, b.width))


def _nearest_area_side(side: int, target: int, granularity: int) -> int:
    """The multiple of ``granularity`` (at least one) that makes ``side * it`` nearest ``target``."""
    low = max(granularity, (target // side) // granularity * granularity)
    candidates = (low, low + granularity)
    return min(candidates, key=lambda other: (abs(side * other - target), abs(math.log(side / other))))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket for an image of ``width x height`` pixels.

    The bucket with the nearest aspect ratio in log space, ``|log(w/h) - log(bw/bh)|`` (so 2:1 and
    1:2 are equally far from square); ties go to the larger area, then the squarer bucket, then the
    wider one.  An image more elongated than every bucket gets the most elongated bucket of its
    orientation.

    Raises:
        ValueError: A non-positive side or no buckets.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to choose from")
    log_aspect = math.log(width) - math.log(height)

    def key(bucket: Bucket) -> tuple[float, int, float, int]:
        bucket_log_aspect = math.log(bucket.width) - math.log(bucket.height)
        distance = round(abs(log_aspect - bucket_log_aspect), 12)
        return (distance, -bucket.area, abs(bucket_log_aspect), -bucket.width)

    return min(buckets, key=key)


@dataclass(frozen=True)
class CropPlan:
    """How one image becomes one bucket: resize to cover the bucket, then centre-crop."""

    bucket: Bucket
    """The bucket the image is trained at."""
    original_size: tuple[int, int]
    """``(width, height)`` of the source image (after its EXIF orientation is applied)."""
    crop_box: tuple[float, float, float, float]
    """``(left, top, right, bottom)`` in source pixel coordinates: the centred region with the
    bucket's aspect ratio that is resampled to the bucket."""
    scale: float
    """``bucket.width / (right - left)``: output pixels per source pixel; > 1 means upscaling."""

    @property
    def needs_upscale(self) -> bool:
        """Whether the image is smaller than the bucket and must be enlarged."""
        return self.scale > 1.0 + 1e-9

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form: ``{"bucket": [w, h], "original_size": [w, h], "crop_box":
        [left, top, right, bottom], "scale": s}``."""
        return {
            "bucket": [self.bucket.width, self.bucket.height],
            "original_size": list(self.original_size),
            "crop_box": list(self.crop_box),
            "scale": self.scale,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CropPlan:
        """Inverse of :meth:`to_json`."""
        left, top, right, bottom = (float(v) for v in data["crop_box"])
        return cls(
            bucket=Bucket(*(int(v) for v in data["bucket"])),
            original_size=(int(data["original_size"][0]), int(data["original_size"][1])),
            crop_box=(left, top, right, bottom),
            scale=float(data["scale"]),
        )


def plan_crop(width: int, height: int, bucket: Bucket) -> CropPlan:
    """Plan resize-to-cover + centre-crop of a ``width x height`` image to ``bucket``.

    The region kept spans the full height of an image wider than the bucket (the sides are cut
    equally) or the full width of a taller one (top and bottom are cut equally).  It is computed
    with the same floating-point steps as ``ImageOps.fit`` so both give identical pixels.

    Raises:
        ValueError: A non-positive side.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    image_aspect = width / height
    bucket_aspect = bucket.width / bucket.height
    if image_aspect == bucket_aspect:
        crop_width, crop_height = float(width), float(height)
    elif image_aspect > bucket_aspect:
        crop_width, crop_height = bucket_aspect * height, float(height)
    else:
        crop_width, crop_height = float(width), width / bucket_aspect
    left = (width - crop_width) * 0.5
    top = (height - crop_height) * 0.5
    return CropPlan(
        bucket=bucket,
        original_size=(width, height),
        crop_box=(left, top, left + crop_width, top + crop_height),
        scale=bucket.width / crop_width,
    )


def apply_crop(image: Image.Image, plan: CropPlan) -> Image.Image:
    """Carry out ``plan``: one Lanczos resample of exactly the crop box to the bucket size.

    ``image.resize((bucket.width, bucket.height), LANCZOS, box=plan.crop_box)`` is resize-to-cover
    followed by a centre crop, without an intermediate image or a second rounding.

    Returns:
        An image of the same mode, of size ``(bucket.width, bucket.height)``.

    Raises:
        ValueError: The image's size is not the plan's ``original_size``.
    """
    if image.size != plan.original_size:
        raise ValueError(
            f"image is {image.size[0]}x{image.size[1]} but the crop was planned for "
            f"{plan.original_size[0]}x{plan.original_size[1]}"
        )
    size = (plan.bucket.width, plan.bucket.height)
    return image.resize(size, Image.Resampling.LANCZOS, box=plan.crop_box)


@functools.lru_cache(maxsize=64)
def _cached_buckets(
    resolution: int, granularity: int, max_aspect: float, step: int | None
) -> tuple[Bucket, ...]:
    return tuple(make_buckets(resolution, granularity, max_aspect, step))


def bucket_for(
    width: int,
    height: int,
    resolution: int,
    granularity: int,
    max_aspect: float = 4.0,
    step: int | None = None,
) -> CropPlan:
    """Choose the bucket for a ``width x height`` image at ``resolution`` and plan its crop.

    The buckets of each (resolution, granularity, max_aspect, step) are made once and cached.
    """
    bucket = nearest_bucket(width, height, _cached_buckets(resolution, granularity, max_aspect, step))
    return plan_crop(width, height, bucket)
