"""Procedural image/caption pairs for demos and tests: coloured shapes on plain backgrounds.

Every image shows one shape (:data:`SHAPES`) in one named colour (:data:`COLOURS`) centred on a plain
background of another named colour, and its caption says exactly that, e.g.
``"a large red circle on a white background"``.  Because the caption is a complete description of
the image, a model fine-tuned on such a folder has something learnable and checkable, and tests can
verify pixels against words.

:func:`make_shapes_dataset` writes the folder layout the data sources read: ``0000.png`` with its
caption in ``0000.txt``, ``0001.png`` / ``0001.txt``, ...  Output is byte-identical for the same
arguments.  From a shell: ``flowtune make-dataset OUT_DIR --count 16 --size 64x64``.

:func:`make_edit_pairs_dataset` writes edit pairs for reference-image families (FLUX.1 Kontext) in
the folder layout :mod:`flowtune.data.sources` reads for them: ``control/0000.png`` shows a shape,
``images/0000.png`` the same shape recoloured, and ``images/0000.txt`` the instruction that turns
one into the other, e.g. ``"make the circle blue"``.

:func:`make_video_dataset` writes tiny clips for video families: a small shape moving across a
plain background (``0000.mp4``, or ``.gif``), captioned with its motion, e.g. ``"a small red
circle moving right on a white background"``.  From a shell: ``flowtune make-dataset OUT_DIR
--video --frames 17 --fps 16``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flowtune.errors import FlowtuneError
from flowtune.fileio import write_errors

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
"""Shape names, as they appear in captions."""

RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (250, 215, 30),
    "orange": (245, 130, 20),
    "purple": (130, 50, 170),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
"""Colour name -> RGB; used for both shapes and backgrounds."""

SIZES: dict[str, float] = {"small": 0.4, "large": 0.8}
"""Size name -> extent of the shape as a fraction of the image's shorter side."""

IMAGE_FORMATS: dict[str, str] = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
"""File suffix (without the dot) -> Pillow format name, for ``image_format``."""

_SUPERSAMPLE = 4  # shapes are drawn at this multiple of the output size, then box-averaged (antialiasing)
_MIN_SIDE = 8  # smallest width or height accepted, in pixels
_MIN_STEM_DIGITS = 4  # file stems are zero-padded to at least this many digits: 0000, 0001, ...
_CAPTION_SUFFIX = ".txt"


class _DatasetError(FlowtuneError, ValueError):
    """A bad argument to :func:`make_shapes_dataset` (also a :class:`ValueError`)."""


class DirectoryNotEmptyError(FlowtuneError, FileExistsError):
    """The output directory already holds files and ``overwrite`` was not set."""


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows: a ``size`` ("small" or "large") ``colour`` ``shape`` on a ``background``.

    ``colour`` and ``background`` are keys of :data:`COLOURS` and must differ; ``shape`` is one of
    :data:`SHAPES`; ``size`` is a key of :data:`SIZES`.
    """

    shape: str
    colour: str
    background: str
    size: str

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("background", self.background, COLOURS)
        _check_choice("size", self.size, SIZES)
        if self.colour == self.background:
            raise _DatasetError(f"the shape colour and the background are both {self.colour!r}; pick two")

    def caption(self) -> str:
        """The caption that describes this image, e.g. ``"a large red circle on a white background"``."""
        article = "an" if self.background[0] in "aeiou" else "a"
        return f"a {self.size} {self.colour} {self.shape} on {article} {self.background} background"


def _check_choice(field: str, value: str, choices: Sequence[str] | dict[str, object]) -> None:
    """Raise a user error if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise _DatasetError(f"unknown {field} {value!r}; choose one of: {', '.join(choices)}")


def _regular_polygon(cx: float, cy: float, radii: Sequence[float], count: int) -> list[tuple[float, float]]:
    """``count`` vertices around (cx, cy), the first pointing up, radii cycled (a star alternates two)."""
    points = []
    for k in range(count):
        angle = -math.pi / 2 + 2 * math.pi * k / count
        r = radii[k % len(radii)]
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _draw_centred(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, extent: float, fill: RGB, background: RGB
) -> None:
    """Draw ``shape`` filling a box of side ``extent`` centred on (cx, cy)."""
    r = extent / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        inner = r * 0.5
        draw.ellipse(box, fill=fill)
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=background)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        # Equilateral, apex up, inscribed in a circle of radius r (height 1.5 r); shifted down by r/4 so
        # that its bounding box, not its centroid, is centred.
        draw.polygon(_regular_polygon(cx, cy + r / 4, (r,), 3), fill=fill)
    elif shape == "star":
        draw.polygon(_regular_polygon(cx, cy, (r, r * 0.42), 10), fill=fill)
    elif shape == "cross":
        arm = extent / 3 / 2  # half the width of each bar
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:  # pragma: no cover - ShapeSpec validates the name
        raise AssertionError(shape)


def draw_shape(
    spec: ShapeSpec, width: int, height: int, centre: tuple[float, float] = (0.5, 0.5)
) -> Image.Image:
    """Render ``spec`` as a ``width`` x ``height`` RGB image with the shape centred.

    The shape spans ``SIZES[spec.size]`` of the shorter side.  It is drawn at :data:`_SUPERSAMPLE`
    times the resolution and box-averaged down, so edge pixels are coverage-weighted blends of the two
    colours and every other pixel is exactly the shape's or the background's colour.  (A LANCZOS
    downsample would ring: halos of a third colour beside edges, and thin parts such as a small ring's
    band would never reach the named colour.)  ``centre``: where the shape's centre is, as fractions
    of the width and height (the middle by default).
    """
    _check_side("width", width)
    _check_side("height", height)
    s = _SUPERSAMPLE
    fill, background = COLOURS[spec.colour], COLOURS[spec.background]
    big = Image.new("RGB", (width * s, height * s), background)
    extent = SIZES[spec.size] * min(width, height) * s
    cx, cy = width * s * centre[0], height * s * centre[1]
    _draw_centred(ImageDraw.Draw(big), spec.shape, cx, cy, extent, fill, background)
    return big.reduce(s)


def _check_side(name: str, value: int) -> None:
    """Raise a user error unless ``value`` is an int of at least :data:`_MIN_SIDE` pixels."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < _MIN_SIDE:
        raise _DatasetError(f"image {name} must be an integer of at least {_MIN_SIDE} pixels, got {value!r}")


def sample_specs(count: int, seed: int = 0) -> list[ShapeSpec]:
    """``count`` random specs from a ``numpy`` Generator seeded with ``seed``; never colour == background.

    This is the sequence :func:`make_shapes_dataset` draws, so ``sample_specs(n, s)[i]`` describes
    image ``i`` of ``make_shapes_dataset(..., count=n, seed=s)``.
    """
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    sizes = list(SIZES)
    specs = []
    for _ in range(count):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour_index = int(rng.integers(len(names)))
        # Any colour but the shape's: draw from the others and skip over the shape's index.
        background_index = int(rng.integers(len(names) - 1))
        background_index += background_index >= colour_index
        size = sizes[int(rng.integers(len(sizes)))]
        specs.append(ShapeSpec(shape, names[colour_index], names[background_index], size))
    return specs


def _owned_suffixes() -> set[str]:
    """Suffixes (lower case, with the dot) of the files this generator writes and may remove."""
    return {f".{suffix}" for suffix in IMAGE_FORMATS} | {_CAPTION_SUFFIX}


def _prepare_directory(out_dir: Path, overwrite: bool, extra_suffixes: frozenset[str] = frozenset()) -> None:
    """Create ``out_dir``; if it holds entries, refuse, or (``overwrite``) remove images and captions.

    Only top-level files whose suffix is an image format of :data:`IMAGE_FORMATS` or ``.txt`` are
    removed, so a re-run never leaves stale pairs behind; other files and sub-directories stay.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise _DatasetError(f"output path {out_dir} exists and is not a directory; choose a directory")
    with write_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    entries = sorted(out_dir.iterdir())
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entry.name for entry in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise DirectoryNotEmptyError(
            f"output directory {out_dir} is not empty ({len(entries)} entries: {shown}); "
            "choose an empty directory or pass overwrite=True (--overwrite) to replace its images and captions"
        )
    owned = _owned_suffixes() | extra_suffixes
    for entry in entries:
        if entry.suffix.lower() in owned and (entry.is_symlink() or entry.is_file()):
            entry.unlink()


def make_shapes_dataset(
    out_dir: str | Path,
    count: int = 16,
    *,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] = ((64, 64),),
    image_format: str = "png",
    overwrite: bool = False,
) -> list[Path]:
    """Write ``count`` shape images and their captions into ``out_dir``; return the image paths.

    Image ``i`` is ``out_dir / f"{i:04d}.{image_format}"`` (wider stems when ``count`` > 10000) and
    its caption, one line, is the same stem with ``.txt``.  The specs come from
    :func:`sample_specs` (``seed``); image ``i`` has size ``sizes[i % len(sizes)]`` as
    ``(width, height)``.  The same arguments always give byte-identical files.

    Raises :class:`DirectoryNotEmptyError` (a :class:`FileExistsError`) if ``out_dir`` has any entry
    and ``overwrite`` is false.  With ``overwrite``, top-level ``.png``/``.jpg``/``.jpeg``/``.webp``
    and ``.txt`` files are removed first (ours or not, so no stale pairs remain); other files are
    kept.  Bad arguments raise a :class:`ValueError` that says what to change.
    """
    _check_count(count)
    sizes = _check_sizes(sizes, "sizes")
    suffix, pil_format = _check_format(image_format)

    out_dir = Path(out_dir)
    _prepare_directory(out_dir, overwrite)
    digits = max(_MIN_STEM_DIGITS, len(str(count - 1)))
    paths = []
    for index, spec in enumerate(sample_specs(count, seed)):
        width, height = sizes[index % len(sizes)]
        stem = f"{index:0{digits}d}"
        image_path = out_dir / f"{stem}.{suffix}"
        _save(draw_shape(spec, width, height), image_path, pil_format)
        _write_caption(out_dir / f"{stem}{_CAPTION_SUFFIX}", spec.caption())
        paths.append(image_path)
    return paths


@dataclass(frozen=True)
class EditSpec:
    """One edit pair: ``source`` (the control image) with its shape recoloured to ``new_colour``
    (the target).  ``new_colour`` differs from the shape's colour and from the background."""

    source: ShapeSpec
    new_colour: str

    def __post_init__(self) -> None:
        _check_choice("new colour", self.new_colour, COLOURS)
        if self.new_colour in (self.source.colour, self.source.background):
            raise _DatasetError(
                f"the new colour {self.new_colour!r} must differ from the shape's colour and the background"
            )

    @property
    def target(self) -> ShapeSpec:
        """What the edited (target) image shows."""
        return dataclasses.replace(self.source, colour=self.new_colour)

    def instruction(self) -> str:
        """The edit instruction (the target's caption), e.g. ``"make the circle blue"``."""
        return f"make the {self.source.shape} {self.new_colour}"


def sample_edit_specs(count: int, seed: int = 0) -> list[EditSpec]:
    """``count`` random edits: the shapes of :func:`sample_specs` (``count``, ``seed``), each with a
    new colour drawn from a generator seeded with ``[seed, 1]``.  This is the sequence
    :func:`make_edit_pairs_dataset` draws."""
    rng = np.random.default_rng([seed, 1])
    edits = []
    for spec in sample_specs(count, seed):
        choices = [name for name in COLOURS if name not in (spec.colour, spec.background)]
        edits.append(EditSpec(spec, choices[int(rng.integers(len(choices)))]))
    return edits


EDIT_IMAGES_DIR = "images"
"""Sub-folder of an edit-pair dataset with the targets and their instructions."""
EDIT_CONTROL_DIR = "control"
"""Sub-folder of an edit-pair dataset with the control (source) images."""


def make_edit_pairs_dataset(
    out_dir: str | Path,
    count: int = 16,
    *,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] = ((64, 64),),
    control_sizes: Sequence[tuple[int, int]] | None = None,
    image_format: str = "png",
    overwrite: bool = False,
) -> list[Path]:
    """Write ``count`` edit pairs into ``out_dir``; return the target image paths.

    Pair ``i`` (stem ``f"{i:04d}"``, wider when ``count`` > 10000) is:

    * ``out_dir/control/<stem>.<image_format>``: the shape of ``sample_edit_specs(count, seed)[i]``
      in its original colour, of size ``control_sizes[i % len(control_sizes)]`` (default: the
      target's size; give other sizes to train on sources and targets of different sizes);
    * ``out_dir/images/<stem>.<image_format>``: the same shape recoloured, of size
      ``sizes[i % len(sizes)]`` as ``(width, height)``;
    * ``out_dir/images/<stem>.txt``: the instruction, e.g. ``"make the circle blue"``.

    The same arguments always give byte-identical files.  Raises :class:`DirectoryNotEmptyError`
    if ``out_dir`` has any entry and ``overwrite`` is false; with ``overwrite``, the image and
    ``.txt`` files directly in ``out_dir``, ``out_dir/images`` and ``out_dir/control`` are removed
    first.  Bad arguments raise a :class:`ValueError` that says what to change.
    """
    _check_count(count)
    target_sizes = _check_sizes(sizes, "sizes")
    source_sizes = target_sizes if control_sizes is None else _check_sizes(control_sizes, "control_sizes")
    suffix, pil_format = _check_format(image_format)

    out_dir = Path(out_dir)
    _prepare_directory(out_dir, overwrite)
    images_dir, control_dir = out_dir / EDIT_IMAGES_DIR, out_dir / EDIT_CONTROL_DIR
    _prepare_directory(images_dir, overwrite=True)
    _prepare_directory(control_dir, overwrite=True)
    digits = max(_MIN_STEM_DIGITS, len(str(count - 1)))
    paths = []
    for index, edit in enumerate(sample_edit_specs(count, seed)):
        stem = f"{index:0{digits}d}"
        target_path = images_dir / f"{stem}.{suffix}"
        _save(draw_shape(edit.target, *target_sizes[index % len(target_sizes)]), target_path, pil_format)
        control = draw_shape(edit.source, *source_sizes[index % len(source_sizes)])
        _save(control, control_dir / f"{stem}.{suffix}", pil_format)
        _write_caption(images_dir / f"{stem}{_CAPTION_SUFFIX}", edit.instruction())
        paths.append(target_path)
    return paths


MOTIONS: dict[str, tuple[float, float]] = {
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "down": (0.0, 1.0),
    "up": (0.0, -1.0),
}
"""Motion word (as in captions) -> direction of travel (x, y)."""

VIDEO_FORMATS: tuple[str, ...] = ("mp4", "gif")
"""Video file formats :func:`make_video_dataset` writes (mp4: MPEG-4 Part 2 video through PyAV)."""

_TRAVEL = 0.4  # fraction of the width (height) the shape's centre travels over a clip


@dataclass(frozen=True)
class MotionSpec:
    """One clip: ``shape`` (always ``small``) travelling ``motion`` (a key of :data:`MOTIONS`)."""

    shape: ShapeSpec
    motion: str

    def __post_init__(self) -> None:
        _check_choice("motion", self.motion, MOTIONS)

    def caption(self) -> str:
        """E.g. ``"a small red circle moving right on a white background"``."""
        s = self.shape
        article = "an" if s.background[0] in "aeiou" else "a"
        return f"a {s.size} {s.colour} {s.shape} moving {self.motion} on {article} {s.background} background"

    def centre(self, index: int, frames: int) -> tuple[float, float]:
        """The shape's centre in frame ``index`` of ``frames``, as fractions of width and height:
        from ``0.5 - 0.2 * direction`` in the first frame to ``0.5 + 0.2 * direction`` in the last."""
        progress = index / (frames - 1) if frames > 1 else 0.5
        dx, dy = MOTIONS[self.motion]
        offset = _TRAVEL * (progress - 0.5)
        return 0.5 + dx * offset, 0.5 + dy * offset

    def frames(self, count: int, width: int, height: int) -> list[Image.Image]:
        """The clip's ``count`` frames."""
        return [draw_shape(self.shape, width, height, self.centre(i, count)) for i in range(count)]


def sample_motion_specs(count: int, seed: int = 0) -> list[MotionSpec]:
    """``count`` clips: the shapes of :func:`sample_specs` (``count``, ``seed``) made small, each
    with a motion drawn from a generator seeded with ``[seed, 2]``.  This is the sequence
    :func:`make_video_dataset` draws."""
    rng = np.random.default_rng([seed, 2])
    motions = list(MOTIONS)
    return [
        MotionSpec(dataclasses.replace(spec, size="small"), motions[int(rng.integers(len(motions)))])
        for spec in sample_specs(count, seed)
    ]


def make_video_dataset(
    out_dir: str | Path,
    count: int = 8,
    *,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] = ((64, 64),),
    frames: int = 17,
    fps: int = 16,
    video_format: str = "mp4",
    overwrite: bool = False,
) -> list[Path]:
    """Write ``count`` clips of a small shape moving across a plain background, with captions.

    Clip ``i`` is ``out_dir / f"{i:04d}.{video_format}"`` (``frames`` frames at ``fps``, of size
    ``sizes[i % len(sizes)]``) and its caption, :meth:`MotionSpec.caption` of
    ``sample_motion_specs(count, seed)[i]``, is the same stem with ``.txt``.  ``mp4`` is MPEG-4
    video at a high bit rate (lossy: pixels are near the named colours, not equal; sides must be
    even); ``gif`` keeps these colours exactly.  :class:`DirectoryNotEmptyError` and the argument
    checks are those of :func:`make_shapes_dataset` (with ``overwrite``, top-level videos and
    captions are removed first).
    """
    _check_count(count)
    sizes = _check_sizes(sizes, "sizes")
    for name, value in (("frames", frames), ("fps", fps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise _DatasetError(f"{name} must be a positive integer, got {value!r}")
    suffix = video_format.lower().lstrip(".")
    _check_choice("video_format", suffix, VIDEO_FORMATS)
    if suffix == "mp4" and any(side % 2 for size in sizes for side in size):
        raise _DatasetError(f"mp4 clips need even sides, got sizes {sizes}; use even sizes or gif")
    out_dir = Path(out_dir)
    _prepare_directory(out_dir, overwrite, extra_suffixes=frozenset(f".{f}" for f in VIDEO_FORMATS))
    digits = max(_MIN_STEM_DIGITS, len(str(count - 1)))
    paths = []
    for index, spec in enumerate(sample_motion_specs(count, seed)):
        width, height = sizes[index % len(sizes)]
        stem = f"{index:0{digits}d}"
        path = out_dir / f"{stem}.{suffix}"
        clip = spec.frames(frames, width, height)
        with write_errors(path, remove=path):
            if suffix == "gif":
                clip[0].save(path, save_all=True, append_images=clip[1:], duration=round(1000 / fps), loop=0)
            else:
                _write_mp4(path, clip, fps)
        _write_caption(out_dir / f"{stem}{_CAPTION_SUFFIX}", spec.caption())
        paths.append(path)
    return paths


def _write_mp4(path: Path, clip: Sequence[Image.Image], fps: int) -> None:
    """Encode ``clip`` (frames of even sides) as MPEG-4 Part 2 video, which every FFmpeg build
    has, in an mp4 file."""
    import av

    width, height = clip[0].size
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 8 * width * height * fps  # about 8 bits a pixel: near lossless here
        stream.codec_context.gop_size = 8
        for image in clip:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise _DatasetError(f"count must be a positive integer, got {count!r}")


def _check_sizes(sizes: Sequence[tuple[int, int]], name: str) -> list[tuple[int, int]]:
    """``sizes`` as a list of ``(width, height)`` ints; a user error if empty or malformed."""
    checked = [tuple(size) for size in sizes]
    if not checked:
        raise _DatasetError(f"{name} is empty; give at least one (width, height)")
    for size in checked:
        if len(size) != 2:
            raise _DatasetError(f"each size must be a (width, height) pair, got {size!r}")
        _check_side("width", size[0])
        _check_side("height", size[1])
    return [(int(w), int(h)) for w, h in checked]


def _check_format(image_format: str) -> tuple[str, str]:
    """``(file suffix, Pillow format)`` of ``image_format``; a user error if unknown."""
    suffix = image_format.lower().lstrip(".")
    _check_choice("image_format", suffix, IMAGE_FORMATS)
    return suffix, IMAGE_FORMATS[suffix]


def _save(image: Image.Image, path: Path, pil_format: str) -> None:
    """Save losslessly where the format allows (WebP), byte-identically for the same image."""
    save_options = {"lossless": True} if pil_format == "WEBP" else {}
    with write_errors(path, remove=path):  # a refused write leaves no truncated image behind
        image.save(path, format=pil_format, **save_options)


def _write_caption(path: Path, caption: str) -> None:
    """Write one caption line (UTF-8, ``\\n``); a refused write is a one-line error."""
    with write_errors(path, remove=path):
        path.write_text(caption + "\n", encoding="utf-8", newline="\n")


def parse_size(text: str) -> tuple[int, int]:
    """``"96x64"`` -> ``(96, 64)`` (width x height); a FlowtuneError for anything else."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise _DatasetError(f"size must look like WIDTHxHEIGHT, e.g. 64x64, got {text!r}")
    return int(parts[0]), int(parts[1])
