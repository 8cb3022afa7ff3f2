"""Aspect-ratio buckets: the bucket set, choosing a bucket, planning and applying the crop."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from flowtune.data import buckets as buckets_module
from flowtune.data.buckets import (
    Bucket,
    CropPlan,
    apply_crop,
    bucket_for,
    default_bucket_step,
    make_buckets,
    nearest_bucket,
    plan_crop,
)


def pattern(width: int, height: int) -> Image.Image:
    """A detailed RGB test image: a checkerboard over horizontal and vertical gradients."""
    y, x = np.mgrid[0:height, 0:width]
    checker = ((x // 3 + y // 3) % 2) * 120
    rgb = np.stack([(x * 255) // max(width - 1, 1), (y * 255) // max(height - 1, 1), checker], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize(("resolution", "max_error"), [(512, 0.035), (1024, 0.02)])
def test_bucket_set_properties(resolution, max_error):
    buckets = make_buckets(resolution, 16)
    target = resolution * resolution
    assert Bucket(resolution, resolution) in buckets
    assert len(buckets) == len(set(buckets)) > 20
    for bucket in buckets:
        assert bucket.width % 16 == 0 and bucket.height % 16 == 0
        assert abs(bucket.area - target) / target <= max_error, bucket
        assert 1 / 4 - 1e-9 <= bucket.aspect <= 4 + 1e-9
    aspects = [b.aspect for b in buckets]
    assert aspects == sorted(aspects)
    assert buckets[0] == Bucket(resolution // 2, resolution * 2)  # 1:4, the tallest
    assert buckets[-1] == Bucket(resolution * 2, resolution // 2)


@pytest.mark.parametrize(("resolution", "granularity"), [(512, 16), (1024, 16), (1024, 64), (768, 32)])
def test_portrait_and_landscape_buckets_mirror_each_other(resolution, granularity):
    buckets = set(make_buckets(resolution, granularity))
    assert all(b.width % granularity == 0 and b.height % granularity == 0 for b in buckets)
    assert {Bucket(b.height, b.width) for b in buckets} == buckets


@pytest.mark.parametrize(("resolution", "granularity"), [(512, 16), (1024, 64)])
def test_one_side_is_the_nearest_area_multiple_for_the_other(resolution, granularity):
    def nearest_area_sides(side: int) -> set[int]:
        errors = {o: abs(side * o - resolution**2) for o in range(granularity, 8 * resolution, granularity)}
        return {o for o, error in errors.items() if error == min(errors.values())}

    for bucket in make_buckets(resolution, granularity):
        assert bucket.height in nearest_area_sides(bucket.width) or bucket.width in nearest_area_sides(
            bucket.height
        ), bucket


def test_bucket_step_spaces_the_sides():
    assert default_bucket_step(1024, 16) == 64 and default_bucket_step(512, 16) == 32
    assert default_bucket_step(64, 16) == 16  # never below the granularity
    coarse = make_buckets(1024, 16)
    fine = make_buckets(1024, 16, step=16)
    assert 30 < len(coarse) < 60 < len(fine)
    # Every bucket has a side on the step grid (the other side is the nearest-area multiple of 16).
    assert all(b.width % 64 == 0 or b.height % 64 == 0 for b in coarse)
    with pytest.raises(ValueError, match="step"):
        make_buckets(1024, 16, step=24)


def test_max_aspect_limits_the_set():
    assert make_buckets(512, 16, max_aspect=1.0) == [Bucket(512, 512)]
    assert all(1 / 2 <= b.aspect <= 2 for b in make_buckets(512, 16, max_aspect=2.0))
    assert len(make_buckets(512, 16, max_aspect=2.0)) < len(make_buckets(512, 16))


@pytest.mark.parametrize(
    ("resolution", "granularity", "max_aspect"), [(500, 16, 4.0), (0, 16, 4.0), (512, 0, 4.0), (512, 16, 0.5)]
)
def test_bad_bucket_arguments(resolution, granularity, max_aspect):
    with pytest.raises(ValueError):
        make_buckets(resolution, granularity, max_aspect)


def test_bucket_str_and_aspect():
    bucket = Bucket(1024, 768)
    assert str(bucket) == "1024x768"
    assert bucket.aspect == pytest.approx(4 / 3)
    assert bucket.area == 1024 * 768
    assert Bucket(16, 32) < Bucket(32, 16)  # ordered by (width, height)


def test_square_image_gets_the_square_bucket():
    assert nearest_bucket(1024, 1024, make_buckets(1024, 16)) == Bucket(1024, 1024)
    assert nearest_bucket(37, 37, make_buckets(1024, 16)) == Bucket(1024, 1024)


def test_widescreen_image_gets_a_16_9_bucket():
    buckets = make_buckets(1024, 16)
    landscape = nearest_bucket(1920, 1080, buckets)
    assert landscape.width > landscape.height
    assert abs(math.log(landscape.aspect / (16 / 9))) < 0.01
    assert nearest_bucket(1080, 1920, buckets) == Bucket(landscape.height, landscape.width)


def test_nearest_is_measured_in_log_space():
    buckets = [Bucket(16, 32), Bucket(48, 16)]  # aspect 1/2 and 3/1
    # A square image is log(2) from 1/2 and log(3) from 3/1 (linear distance would pick 1/2 too,
    # so also check an image of aspect 1.3: linear |1.3 - 0.5| < |1.3 - 3|, but in log space it is
    # 0.96 from 1/2 and 0.84 from 3/1).
    assert nearest_bucket(32, 32, buckets) == Bucket(16, 32)
    assert nearest_bucket(130, 100, buckets) == Bucket(48, 16)


def test_nearest_bucket_tie_breaks():
    # Same distance: the larger area wins.
    assert nearest_bucket(20, 10, [Bucket(32, 16), Bucket(64, 32)]) == Bucket(64, 32)
    # Same distance and area: the squarer wins (aspect 2 is log 2 from both 1:1 and 4:1).
    assert nearest_bucket(20, 10, [Bucket(64, 16), Bucket(32, 32)]) == Bucket(32, 32)
    # Same distance, area and squareness: the wider wins (deterministic).
    assert nearest_bucket(10, 10, [Bucket(32, 64), Bucket(64, 32)]) == Bucket(64, 32)


def test_extreme_images_get_the_most_extreme_bucket():
    buckets = make_buckets(512, 16)
    assert nearest_bucket(10_000, 100, buckets) == buckets[-1] == Bucket(1024, 256)
    assert nearest_bucket(100, 10_000, buckets) == buckets[0] == Bucket(256, 1024)


def test_nearest_bucket_rejects_bad_input():
    with pytest.raises(ValueError):
        nearest_bucket(0, 10, make_buckets(512, 16))
    with pytest.raises(ValueError):
        nearest_bucket(10, 10, [])


@pytest.mark.parametrize(("width", "height"), [(1920, 1080), (1080, 1920), (333, 517), (1024, 768), (64, 64)])
def test_crop_box_is_centred_with_the_bucket_aspect(width, height):
    plan = bucket_for(width, height, 512, 16)
    left, top, right, bottom = plan.crop_box
    assert plan.original_size == (width, height)
    assert left == pytest.approx(width - right) and top == pytest.approx(height - bottom)
    assert 0 <= left <= right <= width and 0 <= top <= bottom <= height
    # The box spans one full side of the image: "resize to cover", not "fit inside".
    assert right - left == pytest.approx(width) or bottom - top == pytest.approx(height)
    assert (right - left) / (bottom - top) == pytest.approx(plan.bucket.aspect, rel=1e-9)
    assert plan.scale == pytest.approx(plan.bucket.width / (right - left))
    assert plan.scale == pytest.approx(plan.bucket.height / (bottom - top))


def test_crop_of_a_wide_image_cuts_the_sides_equally():
    plan = plan_crop(1920, 1080, Bucket(1024, 1024))
    assert plan.crop_box == (420.0, 0.0, 1500.0, 1080.0)
    assert plan.scale == pytest.approx(1024 / 1080)


def test_needs_upscale_for_small_images_only():
    assert bucket_for(100, 50, 512, 16).needs_upscale
    assert bucket_for(64, 64, 512, 16).needs_upscale
    assert not bucket_for(4000, 3000, 512, 16).needs_upscale
    exact = plan_crop(512, 512, Bucket(512, 512))
    assert exact.scale == 1.0 and not exact.needs_upscale


def test_bucket_for_matches_nearest_bucket_and_plan_crop():
    plan = bucket_for(1920, 1080, 1024, 16)
    assert plan == plan_crop(1920, 1080, nearest_bucket(1920, 1080, make_buckets(1024, 16)))
    hits = buckets_module._cached_buckets.cache_info().hits
    bucket_for(640, 480, 1024, 16)
    assert buckets_module._cached_buckets.cache_info().hits == hits + 1


def test_crop_plan_json_round_trip():
    plan = bucket_for(333, 517, 512, 16)
    data = json.loads(json.dumps(plan.to_json()))
    assert data == {
        "bucket": [plan.bucket.width, plan.bucket.height],
        "original_size": [333, 517],
        "crop_box": list(plan.crop_box),
        "scale": plan.scale,
    }
    assert CropPlan.from_json(data) == plan


@pytest.mark.parametrize(("width", "height"), [(80, 45), (45, 80), (33, 71), (64, 64), (20, 21)])
def test_apply_crop_gives_the_bucket_size(width, height):
    plan = bucket_for(width, height, 64, 16)
    for mode in ("RGB", "L"):
        image = pattern(width, height).convert(mode)
        out = apply_crop(image, plan)
        assert out.size == (plan.bucket.width, plan.bucket.height) and out.mode == mode


def test_apply_crop_rejects_an_image_of_another_size():
    plan = plan_crop(80, 40, Bucket(32, 16))
    with pytest.raises(ValueError, match="planned for 80x40"):
        apply_crop(pattern(40, 80), plan)


@pytest.mark.parametrize(
    ("bucket", "size"),
    [
        (Bucket(64, 48), (128, 96)),
        (Bucket(64, 48), (150, 96)),
        (Bucket(48, 64), (96, 150)),
        (Bucket(32, 32), (77, 61)),
    ],
)
def test_apply_crop_equals_pillow_imageops_fit_exactly(bucket, size):
    # plan_crop computes the crop box with the same floating-point steps as ImageOps.fit and
    # apply_crop makes the same single `resize(..., box=...)` call, so the pixels are identical
    # (not just close), whether the box is the whole image (128x96 -> 64x48) or a fractional
    # centre region (150x96 -> 64x48 keeps x in [11.0, 139.0]; 77x61 -> 32x32 keeps [8.0, 69.0]).
    image = pattern(*size)
    ours = apply_crop(image, plan_crop(*size, bucket))
    theirs = ImageOps.fit(image, (bucket.width, bucket.height), method=Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_apply_crop_equals_resize_to_cover_then_centre_crop():
    # 256x96 to 64x48: cover scale 0.5 -> 128x48, then keep the centre 64 columns (32..96).  The
    # single resample of the box samples the same source positions with the same Lanczos support
    # (Pillow reads pixels outside the box), so the two-step result is identical here, where the
    # crop offset is a whole pixel at the resized scale.
    image = pattern(256, 96)
    ours = apply_crop(image, plan_crop(256, 96, Bucket(64, 48)))
    covered = image.resize((128, 48), Image.Resampling.LANCZOS)
    two_step = covered.crop((32, 0, 96, 48))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(two_step))
