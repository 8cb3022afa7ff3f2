"""The procedural shapes dataset: deterministic files whose captions say exactly what is drawn."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowtune.data.synthetic import (
    COLOURS,
    SHAPES,
    SIZES,
    ShapeSpec,
    draw_shape,
    make_shapes_dataset,
    parse_size,
    sample_specs,
)
from flowtune.errors import FlowtuneError

CAPTION = re.compile(r"^a (small|large) (\w+) (\w+) on an? (\w+) background$")


def _read_pairs(paths: list[Path]) -> list[tuple[bytes, bytes]]:
    return [(path.read_bytes(), path.with_suffix(".txt").read_bytes()) for path in paths]


def _parse(caption: str) -> ShapeSpec:
    match = CAPTION.match(caption)
    assert match, caption
    size, colour, shape, background = match.groups()
    return ShapeSpec(shape=shape, colour=colour, background=background, size=size)


def _assert_pixels_match(image: Image.Image, spec: ShapeSpec) -> None:
    """The named colour at the centre (on the band for a ring), the background at the four corners."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    height, width, _ = pixels.shape
    colour, background = np.array(COLOURS[spec.colour]), np.array(COLOURS[spec.background])
    for corner in (pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]):
        np.testing.assert_array_equal(corner, background, err_msg=spec.caption())
    centre = pixels[height // 2, width // 2]
    if spec.shape == "ring":
        np.testing.assert_array_equal(centre, background, err_msg=spec.caption())
        row = pixels[height // 2]
        assert (np.abs(row - colour).max(axis=1) == 0).any(), spec.caption()
    else:
        np.testing.assert_array_equal(centre, colour, err_msg=spec.caption())


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    kwargs = {"count": 8, "seed": 3, "sizes": [(64, 64), (96, 64)]}
    first = make_shapes_dataset(tmp_path / "a", **kwargs)
    second = make_shapes_dataset(tmp_path / "b", **kwargs)
    assert [p.name for p in first] == [f"{i:04d}.png" for i in range(8)]
    assert _read_pairs(first) == _read_pairs(second)


def test_different_seed_gives_different_dataset(tmp_path: Path) -> None:
    first = make_shapes_dataset(tmp_path / "a", count=8, seed=0)
    second = make_shapes_dataset(tmp_path / "b", count=8, seed=1)
    assert _read_pairs(first) != _read_pairs(second)
    assert [s.caption() for s in sample_specs(8, 0)] != [s.caption() for s in sample_specs(8, 1)]


def test_captions_describe_the_sampled_specs(tmp_path: Path) -> None:
    paths = make_shapes_dataset(tmp_path, count=12, seed=5)
    specs = sample_specs(12, seed=5)
    for path, spec in zip(paths, specs, strict=True):
        caption_file = path.with_suffix(".txt")
        assert caption_file.read_text(encoding="utf-8") == spec.caption() + "\n"
        words = spec.caption().split()
        assert spec.colour in words and spec.shape in words and spec.size in words
        assert words[-2:] == [spec.background, "background"]
        assert _parse(spec.caption()) == spec


def test_caption_wording() -> None:
    assert (
        ShapeSpec("circle", "red", "white", "large").caption() == "a large red circle on a white background"
    )
    assert (
        ShapeSpec("star", "blue", "orange", "small").caption() == "a small blue star on an orange background"
    )


def test_written_pixels_match_their_captions(tmp_path: Path) -> None:
    paths = make_shapes_dataset(tmp_path, count=24, seed=7, sizes=[(64, 64), (96, 64), (64, 80)])
    for path in paths:
        with Image.open(path) as image:
            assert image.mode == "RGB"
            _assert_pixels_match(image, _parse(path.with_suffix(".txt").read_text(encoding="utf-8").strip()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", list(SIZES))
def test_every_shape_has_its_colour_at_the_centre(shape: str, size: str) -> None:
    for colour, background in [("red", "white"), ("yellow", "black"), ("purple", "green"), ("white", "blue")]:
        spec = ShapeSpec(shape, colour, background, size)
        image = draw_shape(spec, 64, 48)
        assert image.size == (64, 48) and image.mode == "RGB"
        _assert_pixels_match(image, spec)


@pytest.mark.parametrize("shape", SHAPES)
def test_only_the_two_named_colours_and_antialiased_blends(shape: str) -> None:
    spec = ShapeSpec(shape, "orange", "blue", "large")
    pixels = np.asarray(draw_shape(spec, 96, 64)).reshape(-1, 3).astype(float)
    colour, background = np.array(COLOURS["orange"], float), np.array(COLOURS["blue"], float)
    direction = colour - background
    # Project each pixel on the background -> colour segment; it must lie on it (up to rounding).
    weight = np.clip((pixels - background) @ direction / (direction @ direction), 0, 1)
    off_segment = np.abs(background + weight[:, None] * direction - pixels).max()
    assert off_segment <= 1.0
    assert ((weight > 0.05) & (weight < 0.95)).any(), "edges should be antialiased"
    assert (weight == 1).any() and (weight == 0).any()


def test_shapes_differ_from_each_other() -> None:
    drawn = {np.asarray(draw_shape(ShapeSpec(s, "red", "white", "large"), 64, 64)).tobytes() for s in SHAPES}
    assert len(drawn) == len(SHAPES)
    small = np.asarray(draw_shape(ShapeSpec("square", "red", "white", "small"), 64, 64))
    large = np.asarray(draw_shape(ShapeSpec("square", "red", "white", "large"), 64, 64))
    assert (small != 255).any(axis=2).sum() < (large != 255).any(axis=2).sum()


def test_sampled_specs_cover_the_vocabulary_and_never_hide_the_shape() -> None:
    specs = sample_specs(2000, seed=0)
    assert all(spec.colour != spec.background for spec in specs)
    assert {spec.shape for spec in specs} == set(SHAPES)
    assert {spec.colour for spec in specs} == set(COLOURS)
    assert {spec.background for spec in specs} == set(COLOURS)
    assert {spec.size for spec in specs} == set(SIZES)


def test_spec_rejects_invisible_or_unknown_shapes() -> None:
    with pytest.raises(ValueError, match="both 'red'"):
        ShapeSpec("circle", "red", "red", "large")
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        ShapeSpec("hexagon", "red", "white", "large")
    with pytest.raises(ValueError, match="unknown size"):
        ShapeSpec("circle", "red", "white", "medium")


def test_sizes_cycle(tmp_path: Path) -> None:
    sizes = [(64, 64), (96, 64), (48, 80)]
    paths = make_shapes_dataset(tmp_path, count=7, sizes=sizes)
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            assert image.size == sizes[index % 3]


def test_other_image_formats(tmp_path: Path) -> None:
    paths = make_shapes_dataset(tmp_path, count=2, image_format="jpg")
    assert [p.name for p in paths] == ["0000.jpg", "0001.jpg"]
    with Image.open(paths[0]) as image:
        assert image.format == "JPEG"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 0}, "count must be a positive integer"),
        ({"sizes": []}, "sizes is empty"),
        ({"sizes": [(64, 2)]}, "height must be an integer of at least"),
        ({"image_format": "gif"}, "unknown image_format 'gif'"),
    ],
)
def test_bad_arguments_say_what_to_change(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_shapes_dataset(tmp_path / "out", **kwargs)


def test_refuses_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not empty.*overwrite"):
        make_shapes_dataset(tmp_path, count=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"]


def test_refuses_a_file_as_output_directory(tmp_path: Path) -> None:
    target = tmp_path / "file.png"
    target.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory"):
        make_shapes_dataset(target, count=1)


def test_overwrite_replaces_images_and_captions_only(tmp_path: Path) -> None:
    make_shapes_dataset(tmp_path, count=6, seed=0)
    (tmp_path / "stray.txt").write_text("old caption")
    (tmp_path / "holiday.JPG").write_bytes(b"old image")
    (tmp_path / "notes.md").write_text("keep me")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "0000.png").write_bytes(b"keep me too")

    paths = make_shapes_dataset(tmp_path, count=3, seed=1, overwrite=True)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "0000.png", "0000.txt", "0001.png", "0001.txt", "0002.png", "0002.txt", "notes.md", "sub",
    ]  # fmt: skip
    assert (tmp_path / "notes.md").read_text() == "keep me"
    assert (tmp_path / "sub" / "0000.png").read_bytes() == b"keep me too"
    fresh = make_shapes_dataset(tmp_path / "fresh", count=3, seed=1)
    assert _read_pairs(paths) == _read_pairs(fresh)


def test_parse_size() -> None:
    assert parse_size("96x64") == (96, 64)
    with pytest.raises(FlowtuneError, match="WIDTHxHEIGHT"):
        parse_size("64by64")
