"""Image generation through the family's diffusers pipeline, for ``flowtune sample`` and validation.

flowtune has no sampler of its own: images come from the family's inference pipeline
(``FluxPipeline`` for FLUX.1) with the LoRA loaded by ``load_lora_weights``, so an image made here is
the one plain diffusers makes with the same arguments.  Each image is generated alone (batch 1)
from a CPU generator seeded with its own seed, so any image can be reproduced exactly from the
seed recorded with it, on any device that gives the same pipeline result.

Outputs of one sampling run (:class:`SampleWriter`)::

    OUT/000000.png      an image; its PNG text chunks hold the prompt, seed, steps, guidance, size,
                        model, LoRA and checkpoint (chunk "flowtune" holds all of them as JSON)
    OUT/samples.jsonl   one JSON object per image with the same fields and the file name
    OUT/grid.png        a contact sheet of the run's images, each captioned with prompt and seed

A video family (``FamilySpec.frame_granularity`` > 0) samples clips: ``OUT/000000.mp4`` (H.264)
and, as ``OUT/000000.png``, the clip's frames side by side (a frame strip) with the metadata,
which also names the MP4 (``video``) and records ``frames`` and ``fps``.

Numbering continues after the images already in OUT, so sampling twice into one folder loses
nothing; ``grid.png`` shows the latest run.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flowtune import __version__
from flowtune.distributed import avoid_cudnn_attention
from flowtune.encoders.base import load_pipeline
from flowtune.errors import FlowtuneError
from flowtune.families import FamilySpec
from flowtune.fileio import atomic_path, write_errors

if TYPE_CHECKING:
    from PIL import Image

SAMPLES_FILE = "samples.jsonl"
GRID_FILE = "grid.png"
ADAPTER_NAME = "flowtune"
_IMAGE_NAME = re.compile(r"^(\d{6,})\.png$")
# Side of one cell of the contact sheet, in pixels: images are scaled to fit it (small ones up,
# with nearest-neighbour pixels, so that a 64x64 sample is still visible).
_GRID_MIN_CELL = 256
_GRID_MAX_CELL = 384


@dataclass(frozen=True)
class SampleSettings:
    """How images are generated.

    Attributes:
        seed: Seed of the first image of each prompt; image ``j`` of a prompt uses ``seed + j``.
        steps: Denoising steps.
        guidance: What the family's ``FamilySpec.guidance_argument`` is set to (FLUX.1-dev's
            distilled guidance value, Qwen-Image's ``true_cfg_scale``, ...).
        height, width: Image size in pixels, multiples of the family's granularity.
        num_images: Images per prompt.
        lora_scale: Strength of the LoRA (1 = as trained).
        max_sequence_length: Text tokens per prompt; None = the pipeline's default (512).  From
            a checkpoint, its recipe's ``data.max_sequence_length``: the text length the LoRA
            was trained with.
        negative_prompt: The negative prompt of families sampled with classifier-free guidance
            (``FamilySpec.negative_prompt``); None = none (the families that take none).
        frames: Video families (``FamilySpec.frame_granularity`` > 0): frames per clip,
            ``frame_granularity * n + 1``; None = the pipeline's default.  Image families: None.
        fps: Video families: the frame rate the MP4 is written at; None = the family's
            (``FamilySpec.fps``).
        guidance_2: A two-expert pipeline's guidance for its low-noise expert (its
            ``guidance_scale_2``, :mod:`flowtune.experts`); None = ``guidance`` for both.
    """

    seed: int = 42
    steps: int = 28
    guidance: float = 3.5
    height: int = 1024
    width: int = 1024
    num_images: int = 1
    lora_scale: float = 1.0
    max_sequence_length: int | None = None
    negative_prompt: str | None = None
    frames: int | None = None
    fps: int | None = None
    guidance_2: float | None = None

    def check(self, spec: FamilySpec) -> None:
        """Raise a :class:`FlowtuneError` for settings the pipeline cannot use."""
        g = spec.spatial_granularity
        for name, value in (("height", self.height), ("width", self.width)):
            if value < g or value % g:
                raise FlowtuneError(
                    f"{name} {value} is not a positive multiple of {g}, which {spec.name} needs"
                )
        if self.steps < 1:
            raise FlowtuneError(f"steps must be at least 1, got {self.steps}")
        if self.num_images < 1:
            raise FlowtuneError(f"num-images must be at least 1, got {self.num_images}")
        if self.negative_prompt is not None and spec.negative_prompt is None:
            raise FlowtuneError(f"{spec.name} samples without a negative prompt; leave out --negative-prompt")
        if spec.frame_granularity == 0 and (self.frames is not None or self.fps is not None):
            raise FlowtuneError(f"{spec.name} samples images; leave out --frames and --fps")
        if self.frames is not None:
            from flowtune.data.video import frames_problem

            problem = frames_problem(spec, self.frames)
            if problem is not None:
                raise FlowtuneError(f"frames {self.frames}: {problem}")
        if self.fps is not None and self.fps < 1:
            raise FlowtuneError(f"fps must be at least 1, got {self.fps}")

    def frame_rate(self, spec: FamilySpec) -> int | None:
        """The frame rate of a video family's clips: :attr:`fps`, else the family's; None for an
        image family (its samples are images)."""
        if spec.frame_granularity == 0:
            return None
        return self.fps if self.fps is not None else spec.fps


@dataclass
class SampleJob:
    """One image to generate.

    Attributes:
        prompt: The prompt text (recorded with the image).
        seed: The seed of its CPU generator.
        inputs: The pipeline's prompt arguments: ``{"prompt": text}``, or precomputed embeddings
            (``prompt_embeds``... with a batch dimension of 1) when the text encoders are not
            loaded; plus the reference image arguments of image-editing families.
        references: The reference image files (recorded with the image).
    """

    prompt: str
    seed: int
    inputs: dict[str, Any] = field(default_factory=dict)
    references: tuple[str, ...] = ()


def plan_jobs(
    prompts: Sequence[str],
    settings: SampleSettings,
    inputs: Sequence[dict[str, Any]] | None = None,
    references: Sequence[tuple[str, ...]] | None = None,
) -> list[SampleJob]:
    """``settings.num_images`` jobs per prompt, seeded ``seed, seed + 1, ...``.

    Args:
        inputs: Per prompt, the pipeline's prompt arguments (default ``{"prompt": prompt}``).
        references: Per prompt, its reference image files (image-editing families).
    """
    jobs = []
    for i, prompt in enumerate(prompts):
        prompt_inputs = inputs[i] if inputs is not None else {"prompt": prompt}
        refs = tuple(references[i]) if references is not None else ()
        for j in range(settings.num_images):
            jobs.append(SampleJob(prompt, settings.seed + j, prompt_inputs, refs))
    return jobs


def pair_references(
    spec: FamilySpec,
    prompts: Sequence[str],
    images: Sequence[str | Path],
    size: tuple[int, int] | None = None,
    control_resize: str = "pipeline",
) -> list[tuple[str, ...]] | None:
    """Which reference image goes with which prompt: one image for every prompt, or one per prompt.

    Args:
        size: (width, height) of the images to sample: with ``control_resize`` ``match_target``
            the references are handed to the pipeline at that size, otherwise at their own, and
            each is checked against the family's pipeline (:meth:`FamilyEncoder.reference_problem`)
            before any model is loaded.  None = not checked.
        control_resize: ``data.control_resize`` of the LoRA.

    Returns:
        Per prompt, its reference files; None for families without reference images, and for
        text-to-image prompts (no images) of families whose references are optional.

    Raises:
        FlowtuneError: images for a family that takes none, none for one that needs them, a
            count that is neither 1 nor the number of prompts, a missing or unreadable file, or
            one the family's pipeline would refuse.
    """
    if not spec.reference_images and not spec.first_frame_images:
        if images:
            raise FlowtuneError(f"{spec.name} models take no reference image; leave out --image")
        return None
    if not images:
        if spec.references_optional or spec.first_frame_images:
            return None
        raise FlowtuneError(f"{spec.name} models edit a reference image: give --image FILE")
    for image in images:
        if not Path(image).is_file():
            raise FlowtuneError(f"no image file at {image}")
        if size is not None:
            _check_reference(spec, image, size, control_resize)
    if len(images) == 1:
        return [(str(images[0]),)] * len(prompts)
    if len(images) != len(prompts):
        raise FlowtuneError(
            f"{len(images)} images for {len(prompts)} prompts: give one --image for all prompts, or one per prompt"
        )
    return [(str(image),) for image in images]


def _check_reference(spec: FamilySpec, image: str | Path, size: tuple[int, int], control_resize: str) -> None:
    """Raise a :class:`FlowtuneError` naming ``image`` if the family's pipeline would refuse it."""
    from flowtune.data.images import ImageError, probe_image

    if control_resize == "match_target":
        width, height = size
    else:
        try:
            info = probe_image(Path(image).read_bytes())
            width, height = info.width, info.height
        except (OSError, ImageError) as exc:
            raise FlowtuneError(f"cannot read the image {image}: {exc}") from None
    problem = spec.load_encoder_class().reference_problem(width, height)
    if problem is not None:
        raise FlowtuneError(f"the reference image {image} ({width}x{height}) cannot be used: {problem}")


def load_references(files: Sequence[str]) -> list[Image.Image]:
    """Decode reference image files to RGB (EXIF orientation applied, as for training data).

    Raises:
        FlowtuneError: a file that cannot be read or decoded.
    """
    from flowtune.data.images import ImageError, load_rgb

    images = []
    for file in files:
        try:
            images.append(load_rgb(Path(file).read_bytes()))
        except (OSError, ImageError) as exc:
            raise FlowtuneError(f"cannot read the image {file}: {exc}") from None
    return images


def pipeline_frames(spec: FamilySpec) -> int:
    """The frames per clip that a video family's pipeline samples by default (its ``__call__``'s
    ``num_frames`` default, e.g. WanPipeline's 81), read without loading anything; 1 for image
    families."""
    import diffusers

    if spec.frame_granularity == 0:
        return 1
    call = inspect.signature(getattr(diffusers, spec.pipeline_class).__call__)
    return int(call.parameters["num_frames"].default)


def _takes(pipe: Any, argument: str) -> bool:
    """Whether the pipeline's ``__call__`` has the keyword ``argument``."""
    return argument in inspect.signature(type(pipe).__call__).parameters


def generate_frames(
    pipe: Any, job: SampleJob, settings: SampleSettings, spec: FamilySpec
) -> list[Image.Image]:
    """Run the family's diffusers pipeline for one job; returns a sample's frames as PIL images:
    one (the image) for image families, the clip's for video families
    (``FamilySpec.frame_granularity`` > 0: ``num_frames`` is ``settings.frames`` when given,
    and the pipeline's output is its ``frames``).

    The guidance goes to the family's ``guidance_argument``; a negative prompt goes with a text
    prompt as ``negative_prompt`` (with cached embeddings the job's inputs hold the negative
    prompt's embeddings instead).
    """
    generator = torch.Generator(device="cpu").manual_seed(job.seed)
    inputs = dict(job.inputs)
    # The trained text length, where the pipeline encodes the prompt and takes one (HunyuanVideo
    # 1.5's has a fixed one); given embeddings were encoded at it already.
    text = "prompt" in inputs
    if settings.max_sequence_length is not None and text and _takes(pipe, "max_sequence_length"):
        inputs.setdefault("max_sequence_length", settings.max_sequence_length)
    if settings.negative_prompt is not None and text:
        inputs.setdefault("negative_prompt", settings.negative_prompt)
    inputs.update(spec.guidance_inputs(pipe, settings.guidance))
    if settings.guidance_2 is not None:  # the low-noise expert's (flowtune.experts)
        if getattr(pipe, "transformer_2", None) is None or not _takes(pipe, "guidance_scale_2"):
            raise FlowtuneError(
                "guidance 2 (--guidance-2, validation.guidance_2) is for two-expert models; this one has "
                "one transformer: leave it out"
            )
        inputs["guidance_scale_2"] = settings.guidance_2
    video = spec.frame_granularity > 0
    if video and settings.frames is not None:
        inputs["num_frames"] = settings.frames
    if _takes(pipe, "height"):  # image-to-video pipelines take the first frame's size
        inputs.update(height=settings.height, width=settings.width)
    result = pipe(
        **inputs,
        num_inference_steps=settings.steps,
        generator=generator,
        output_type="pil",
    )
    return list(result.frames[0]) if video else [result.images[0]]


def read_prompts(prompts: Iterable[str] = (), prompts_file: Path | None = None) -> list[str]:
    """The prompts given on the command line, then those of a file (one per line; blank lines
    are skipped).

    Raises:
        FlowtuneError: the file is missing, or a prompt is blank.
    """
    result = list(prompts)
    if prompts_file is not None:
        try:
            text = Path(prompts_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise FlowtuneError(
                f"cannot read the prompts file {prompts_file}: {exc.strerror or exc}"
            ) from None
        result.extend(line.strip() for line in text.splitlines() if line.strip())
    if any(not p.strip() for p in result):
        raise FlowtuneError("a --prompt is empty; give the text of every prompt")
    return result


# ---------------------------------------------------------------------------------------- writing


class SampleWriter:
    """Writes images with their metadata (PNG text chunks and ``samples.jsonl``) and the grid.

    Args:
        out_dir: The output directory (created).
        info: Fields recorded with every image besides the job's and the settings' (model, LoRA,
            checkpoint, step, ...); ``None`` values are left out, paths are written as strings.
    """

    def __init__(self, out_dir: Path, info: dict[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self._made = [p for p in (self.out_dir, *self.out_dir.parents) if not p.exists()]  # deepest first
        with write_errors(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.info = {
            k: str(v) if isinstance(v, Path) else v for k, v in (info or {}).items() if v is not None
        }
        existing = [int(m.group(1)) for p in self.out_dir.iterdir() if (m := _IMAGE_NAME.match(p.name))]
        self.next_index = max(existing, default=-1) + 1
        self.images: list[tuple[Image.Image, str]] = []
        self.records: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def removed_if_unused(self) -> Iterator[SampleWriter]:
        """On a failure before any file was written (a model that does not load, a LoRA that
        does not fit), remove the folders this writer made, so that no empty ``--out`` is left."""
        try:
            yield self
        except BaseException:
            for folder in self._made:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
            raise

    def add(self, image: Image.Image, job: SampleJob, settings: SampleSettings) -> Path:
        """Save one image as ``NNNNNN.png`` with its metadata; returns its path."""
        name = self._next_name()
        return self._save(image, self._record(name, job, settings), job)

    def add_clip(
        self, frames: Sequence[Image.Image], job: SampleJob, settings: SampleSettings, fps: int
    ) -> Path:
        """Save one clip of a video family: ``NNNNNN.mp4`` (H.264, ``fps`` frames per second) and
        ``NNNNNN.png``, its frames side by side (a frame strip) with the metadata, which also
        records ``video`` (the MP4's name), ``frames`` and ``fps``; returns the strip's path."""
        name = self._next_name()
        video = name.removesuffix(".png") + ".mp4"
        write_mp4(frames, self.out_dir / video, fps)
        extra = {"video": video, "frames": len(frames), "fps": fps}
        return self._save(frame_strip(frames), self._record(name, job, settings, extra), job)

    def add_sample(
        self, frames: Sequence[Image.Image], job: SampleJob, settings: SampleSettings, fps: int | None
    ) -> Path:
        """Save a sample of :func:`generate_frames`: an image (``fps`` None: an image family's,
        one frame) or a clip (:meth:`add_clip`); returns the PNG's path."""
        if fps is None:
            (image,) = frames
            return self.add(image, job, settings)
        return self.add_clip(frames, job, settings, fps)

    def _next_name(self) -> str:
        name = f"{self.next_index:06d}.png"
        self.next_index += 1
        return name

    def _record(
        self, name: str, job: SampleJob, settings: SampleSettings, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """What is recorded with the sample ``name``: the job, the settings and :attr:`info`."""
        record = {
            "file": name,
            **(extra or {}),
            "prompt": job.prompt,
            "seed": job.seed,
            "steps": settings.steps,
            "guidance": settings.guidance,
            **({"negative_prompt": settings.negative_prompt} if settings.negative_prompt is not None else {}),
            "height": settings.height,
            "width": settings.width,
            **({"image": ", ".join(job.references)} if job.references else {}),
            **self.info,
        }
        if "lora" in self.info:
            record["lora_scale"] = settings.lora_scale
        return record

    def _save(self, image: Image.Image, record: dict[str, Any], job: SampleJob) -> Path:
        """Write ``image`` as ``record["file"]`` with ``record`` in its PNG text chunks, and append
        ``record`` to ``samples.jsonl``."""
        from PIL.PngImagePlugin import PngInfo

        chunks = PngInfo()
        for key, value in record.items():
            if key != "file":
                chunks.add_text(key, str(value))
        chunks.add_text("software", f"flowtune {__version__}")
        chunks.add_text("flowtune", json.dumps(record, sort_keys=True))
        path = self.out_dir / record["file"]
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=chunks)
        records = self.out_dir / SAMPLES_FILE
        with write_errors(records), open(records, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.images.append((image, f"{job.prompt} (seed {job.seed})"))
        self.records.append(record)
        return path

    def write_grid(self, columns: int | None = None) -> Path | None:
        """Write ``grid.png``: this writer's images in a captioned contact sheet (None if none)."""
        if not self.images:
            return None
        sheet = contact_sheet([i for i, _ in self.images], [c for _, c in self.images], columns)
        path = self.out_dir / GRID_FILE
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="PNG")
        return path


def frame_strip(frames: Sequence[Image.Image]) -> Image.Image:
    """A clip's frames side by side, left to right, in one RGB image (F x W wide, H high)."""
    from PIL import Image

    width, height = frames[0].size
    strip = Image.new("RGB", (width * len(frames), height))
    for k, frame in enumerate(frames):
        strip.paste(frame.convert("RGB"), (k * width, 0))
    return strip


def write_mp4(frames: Sequence[Image.Image], path: Path, fps: int) -> None:
    """Write frames as an H.264 MP4 (PyAV's libx264, yuv420p, CRF 17: visually lossless) at
    ``fps`` frames per second, atomically (:func:`flowtune.fileio.atomic_path`)."""
    import av

    width, height = frames[0].size
    with atomic_path(path) as tmp, av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        # yuv420p (what players expect) halves the chroma resolution: sides must be even.
        stream.width, stream.height = width - width % 2, height - height % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "17"}
        for frame in frames:
            image = frame.convert("RGB").crop((0, 0, stream.width, stream.height))
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())  # flush the encoder


def contact_sheet(
    images: Sequence[Image.Image], captions: Sequence[str], columns: int | None = None
) -> Image.Image:
    """Images in a grid, each scaled to fit a square cell with its caption (wrapped, at most three
    lines) underneath.

    Args:
        images: PIL images of any sizes.
        captions: One caption per image.
        columns: Images per row (default: about square).
    """
    from PIL import Image, ImageDraw, ImageFont

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell = min(_GRID_MAX_CELL, max(_GRID_MIN_CELL, max(max(im.size) for im in images)))
    font_size = max(10, cell // 24)
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow without FreeType: a fixed bitmap font
        font = ImageFont.load_default()
    line_height = font_size + 4
    caption_height = 3 * line_height + 8
    pad = 8
    sheet = Image.new(
        "RGB", (columns * (cell + pad) + pad, rows * (cell + caption_height + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for n, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x = pad + (n % columns) * (cell + pad)
        y = pad + (n // columns) * (cell + caption_height + pad)
        factor = cell / max(image.size)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        resample = Image.Resampling.NEAREST if factor > 1 else Image.Resampling.LANCZOS
        thumb = image.convert("RGB").resize(size, resample)
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        for k, line in enumerate(_wrap(draw, caption, font, cell, max_lines=3)):
            draw.text((x, y + cell + 4 + k * line_height), line, fill="black", font=font)
    return sheet


def _wrap(draw: Any, text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; the last line ends with "..." when text is cut."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last + "..."]
    return lines


# ---------------------------------------------------------------------------------------- loading


def check_lora(
    spec: FamilySpec, transformer: torch.nn.Module, lora_file: Path, base_model: str | None = None
) -> list[str]:
    """Check that a LoRA file fits ``transformer`` before diffusers loads it.

    Reads the file through the family pipeline's ``lora_state_dict`` (which also converts kohya
    and other formats) and compares every LoRA layer with the transformer's module of that name.

    Returns:
        Warnings: the LoRA was trained on another base model of the same architecture.

    Raises:
        FlowtuneError: the file is missing or unreadable, was made for another family, targets
            modules this transformer does not have, or has layer sizes that do not match.
    """

    from flowtune.train.model import META_BASE_MODEL, META_FAMILY, read_lora_metadata

    lora_file = Path(lora_file)
    if not lora_file.is_file():
        raise FlowtuneError(f"no LoRA file at {lora_file}")
    try:
        metadata = read_lora_metadata(lora_file)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one message
        raise FlowtuneError(f"{lora_file} is not a safetensors LoRA file ({exc})") from None
    family = metadata.get(META_FAMILY)
    if family is not None and family != spec.name:
        raise FlowtuneError(f"{lora_file} is a LoRA for the {family} family; this model is {spec.name}")
    pipeline_class = spec.lora_class()
    try:
        state = pipeline_class.lora_state_dict(str(lora_file))
    except Exception as exc:  # noqa: BLE001 - diffusers' converters raise many kinds
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlowtuneError(f"{lora_file} is not a LoRA for {spec.pipeline_class}: {reason}") from None
    state = state[0] if isinstance(state, tuple) else state
    prefix = f"{pipeline_class.transformer_name}."
    modules = dict(transformer.named_modules())
    layers = 0
    for key, tensor in state.items():
        if not key.startswith(prefix) or not key.endswith(".lora_A.weight"):
            continue
        name = key[len(prefix) : -len(".lora_A.weight")]
        up = state.get(f"{prefix}{name}.lora_B.weight")
        module = modules.get(name)
        if module is None or not hasattr(module, "in_features"):
            raise FlowtuneError(
                f"{lora_file} does not fit this model: it has a LoRA layer for {name!r}, which this "
                f"{spec.transformer_class} does not have (a LoRA for another model?)"
            )
        out_features = up.shape[0] if up is not None else module.out_features
        if tensor.shape[1] != module.in_features or out_features != module.out_features:
            raise FlowtuneError(
                f"{lora_file} was made for another base model: its layer {name!r} is "
                f"{tensor.shape[1]}->{out_features}, this model's is {module.in_features}->{module.out_features}"
            )
        layers += 1
    if layers == 0:
        raise FlowtuneError(f"{lora_file} has no LoRA layers for the {spec.transformer_class}")
    trained_on = metadata.get(META_BASE_MODEL)
    if base_model is not None and trained_on is not None and trained_on != base_model:
        return [f"the LoRA was trained on {trained_on}; sampling it with {base_model}"]
    return []


def add_lora(pipe: Any, lora_file: Path, scale: float = 1.0) -> None:
    """Load a LoRA file into the pipeline at the given strength: with its ``load_lora_weights``,
    or, for pipelines without a LoRA loader (``FamilySpec.lora_loader``), with its transformer's
    ``load_lora_adapter`` (the file's keys under the loader's ``transformer.`` prefix).  A LoRA
    trained on the low-noise expert of a two-expert pipeline (:func:`flowtune.experts.lora_expert`)
    goes into ``transformer_2`` (``load_into_transformer_2=True``)."""
    from flowtune.experts import expert_component, lora_expert

    lora_file = Path(lora_file)
    component = expert_component(lora_expert(lora_file))
    into = {"load_into_transformer_2": True} if component != "transformer" else {}
    if into and getattr(pipe, component, None) is None:
        raise FlowtuneError(
            f"{lora_file} was trained on the low-noise expert ({component}) of a two-expert model; "
            "this model has none"
        )
    with warnings.catch_warnings():
        # On a torchao-quantized transformer (--quantize) peft warns that its LoRA layers cannot
        # merge into the quantized weights; sampling never merges.
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass")
        if hasattr(pipe, "load_lora_weights"):
            pipe.load_lora_weights(
                str(lora_file.parent), weight_name=lora_file.name, adapter_name=ADAPTER_NAME, **into
            )
        else:
            pipe.transformer.load_lora_adapter(
                str(lora_file), prefix="transformer", adapter_name=ADAPTER_NAME
            )
    # The loaders leave the new LoRA layers in train mode: a file that records a dropout would
    # otherwise drop parts of the update at random while sampling.
    transformer = getattr(pipe, component)
    transformer.eval()
    if scale != 1.0:
        transformer.set_adapters([ADAPTER_NAME], weights=[scale])


def _quantize(pipe: Any, source: SampleSource, device: str | None) -> None:
    """Quantize the loaded pipeline's transformers (``source.quantize``; both experts of a
    two-expert model, as training quantizes the frozen other one) and text encoders
    (``source.encoder_quantize``) in place, layer by layer on ``device`` (None: where they are;
    with ``source.block_offload`` the transformers' layers back in CPU memory), before any LoRA
    is loaded: peft then wraps an int8/fp8 layer in its ``TorchaoLoraLinear`` and an nf4 one in
    its plain LoRA ``Linear``, both adding the LoRA on top of the quantized weight."""
    import diffusers

    from flowtune.memory.quantize import quantize_linears, quantize_text_encoders

    if source.quantize is not None:
        spec = source.spec
        for transformer in pipe.components.values():  # both experts of a two-expert model
            if not isinstance(transformer, getattr(diffusers, spec.transformer_class)):
                continue
            transformer.requires_grad_(False)
            # With --block-offload every quantized layer goes back to CPU memory: the text
            # encoders have the GPU to themselves first, then place_with_block_offload moves
            # the resident part.
            host = ("*",) if source.block_offload is not None else ()
            quantize_linears(transformer, source.quantize, spec.quantize_skip, device, host)
    if source.encoder_quantize is not None:
        quantize_text_encoders(pipe, source.encoder_quantize, source.spec.encoder_quantize_skip, device)


def encode_prompts_first(
    pipe: Any,
    spec: FamilySpec,
    model_dir: Path,
    prompts: Sequence[str],
    settings: SampleSettings,
    dtype: str,
    device: str,
) -> list[dict[str, Any]]:
    """Each prompt's pipeline arguments as embeddings (``prompt_embeds``..., batch 1, on
    ``device``), encoded by the pipeline's own text encoders on ``device`` one prompt at a time,
    as the pipeline encodes a prompt, with the negative prompt's (``settings.negative_prompt``,
    else the family's implicit one) where the family has one; then the text encoders are dropped
    from ``pipe``, so that sampling never has them on the GPU beside the transformer.  The same
    arguments validation passes from cached embeddings (:meth:`FamilyEncoder.prompt_inputs`)."""
    from flowtune.encoders.base import EncoderSettings, create_encoder

    length = settings.max_sequence_length
    if length is None:  # the pipeline's own default (sampling a base model and a LoRA)
        parameter = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
        length = parameter.default if parameter is not None else 0
    encoder = create_encoder(spec, model_dir, EncoderSettings(dtype, length, "mode"), device)  # type: ignore[arg-type]
    encoder.pipe = pipe
    names = [n for n in encoder.text_components if isinstance(getattr(pipe, n, None), torch.nn.Module)]
    for name in names:
        getattr(pipe, name).to(device)

    def encoded(prompt: str) -> dict[str, Any]:  # as a cache entry: each field batch 1
        return {field: value[0].unsqueeze(0) for field, value in encoder.encode_prompts([prompt]).items()}

    negative: dict[str, Any] = {}
    negative_prompt = spec.cached_negative_prompt(settings.negative_prompt)
    if negative_prompt is not None:
        negative = encoder.negative_inputs(encoded(negative_prompt))
    inputs = [{**encoder.prompt_inputs(encoded(prompt)), **negative} for prompt in dict.fromkeys(prompts)]
    by_prompt = dict(zip(dict.fromkeys(prompts), inputs, strict=True))
    pipe.register_modules(**dict.fromkeys(names))
    if torch.device(device).type != "cpu":  # modules in reference cycles hold their memory till then
        import gc

        gc.collect()
    return [by_prompt[prompt] for prompt in prompts]


def place_with_block_offload(pipe: Any, spec: FamilySpec, resident: int, device: str) -> None:
    """Put ``pipe`` on ``device`` but the weights of its transformers' blocks past the last
    ``resident`` ones, which stay in pinned CPU memory and stream in as each block runs
    (:func:`flowtune.train.offload.offload_blocks`, as ``train.block_offload`` streams them)."""
    import diffusers

    from flowtune.train.offload import offload_blocks

    transformer_class = getattr(diffusers, spec.transformer_class)
    for component in pipe.components.values():
        if isinstance(component, transformer_class):
            # Every weight is frozen here, the LoRA's too: offload_blocks streams frozen ones.
            component.requires_grad_(False)
            offload_blocks(component, spec, resident, torch.device(device))
        elif isinstance(component, torch.nn.Module):
            component.to(device)


# ---------------------------------------------------------------------------------------- the command


@dataclass
class SampleSource:
    """What to sample from, resolved from ``--ckpt`` or ``--model``/``--lora``.

    Attributes:
        spec: The model family.
        pretrained: The base model (Hub id or directory), as the user or the recipe names it.
        revision, variant: Hub revision and weight variant of the base model.
        dtype: Dtype to load the pipeline in.
        lora_file: The LoRA to load, if any.
        transformer_dir: A fully fine-tuned transformer (diffusers format) replacing the base one.
        checkpoint: The checkpoint directory, when sampling from one.
        step: The checkpoint's training step, when known.
        defaults: Sampling settings from the checkpoint's recipe (``validation.*``).
        prompts: Default prompts (the recipe's ``validation.prompts``).
        images: Default reference images (the recipe's ``validation.images``).
        control_resize: How references are resized (the recipe's ``data.control_resize``).
        model_name: How errors about the base model name it: ``--model`` or ``model.pretrained``.
        model_hint: Where errors about the base model send the user (a checkpoint's recipe), or None.
        quantize: Store the transformer's linear weights as ``int8``, ``fp8`` or ``nf4`` (as
            ``model.quantize``; the family's ``quantize_skip`` layers stay in ``dtype``), before
            the LoRA is loaded onto them.  From a checkpoint: its recipe's ``model.quantize``.
        encoder_quantize: The same for the text encoders (as ``model.encoder_quantize``).
        block_offload: Keep this many of the transformer's blocks on the GPU and stream the
            others' weights from pinned CPU memory (as ``train.block_offload``); the prompts are
            then encoded before sampling and the text encoders freed (:func:`sample`).  From a
            checkpoint: its recipe's ``train.block_offload``.
    """

    spec: FamilySpec
    pretrained: str
    revision: str | None = None
    variant: str | None = None
    dtype: str | None = None
    lora_file: Path | None = None
    transformer_dir: Path | None = None
    checkpoint: Path | None = None
    step: int | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    control_resize: str = "pipeline"
    model_name: str = "--model"
    model_hint: str | None = None
    quantize: str | None = None
    encoder_quantize: str | None = None
    block_offload: int | None = None

    def model_dir(self, components: Sequence[str]) -> Path:
        """The base model's local directory with ``components`` (downloaded if needed), checked to
        hold this family's pipeline.

        Raises:
            FlowtuneError: it cannot be found or fetched, or holds another family's model
                (prefixed with :attr:`model_hint`).
        """
        from flowtune.model_files import resolve_pretrained

        try:
            return resolve_pretrained(
                self.pretrained, self.revision, components, family=self.spec, name=self.model_name
            )
        except FlowtuneError as exc:
            if self.model_hint is None:
                raise
            raise FlowtuneError(f"{self.model_hint}: {exc}") from None


def source_from_checkpoint(ckpt: Path, base_model: str | None = None) -> SampleSource:
    """The base model, weights and defaults of a flowtune checkpoint (or run directory).

    Args:
        base_model: Use this base model instead of the recipe's ``model.pretrained`` (a relative
            path that no longer resolves, a moved download, a compatible fine-tune).
    """
    from flowtune.families import get_family
    from flowtune.recipe import load_recipe
    from flowtune.train.checkpoint import resolve_trained
    from flowtune.train.model import LORA_WEIGHTS_NAME

    trained = resolve_trained(ckpt, LORA_WEIGHTS_NAME)
    recipe = load_recipe(trained.recipe_file)
    v = recipe.validation
    return SampleSource(
        spec=get_family(recipe.model.family),
        pretrained=base_model or recipe.model.pretrained,
        revision=None if base_model else recipe.model.revision,
        variant=recipe.model.variant,
        dtype=recipe.model.dtype,
        lora_file=trained.lora_file,
        transformer_dir=trained.transformer_dir,
        checkpoint=trained.path,
        step=trained.step,
        defaults={
            "seed": v.seed,
            "steps": v.steps,
            "guidance": v.guidance,
            "guidance_2": v.guidance_2,
            "negative_prompt": v.negative_prompt,
            "height": v.height,
            "width": v.width,
            "frames": v.frames,
            # The clips' frame rate: the one the LoRA was trained at (data.fps), when set.
            "fps": round(recipe.data.fps) if recipe.data.fps is not None else None,
            "max_sequence_length": recipe.data.max_sequence_length,
        },
        prompts=list(v.prompts),
        images=list(v.images),
        control_resize=recipe.data.control_resize,
        model_name="--model" if base_model else "model.pretrained",
        model_hint=None
        if base_model
        else f"the base model of {trained.recipe_file} (give another with --model)",
        quantize=recipe.model.quantize,
        encoder_quantize=recipe.model.encoder_quantize,
        block_offload=recipe.train.block_offload,
    )


def source_from_model(model: str, lora: Path | None, revision: str | None = None) -> SampleSource:
    """A base model (Hub id or diffusers directory) and an optional LoRA file; the family comes
    from the pipeline class in its ``model_index.json``."""
    from flowtune.families import family_for_pipeline
    from flowtune.model_files import read_pipeline_class, resolve_pretrained

    where = f"--model {model!r}"
    class_name = read_pipeline_class(resolve_pretrained(model, revision, [], name="--model"), where)
    if class_name is None:
        raise FlowtuneError(f"{where} has no model_index.json; give a diffusers-format pipeline directory")
    spec = family_for_pipeline(class_name)
    return SampleSource(
        spec=spec,
        pretrained=model,
        revision=revision,
        lora_file=lora,
        defaults={"guidance": spec.guidance, "negative_prompt": spec.negative_prompt},
    )


@dataclass
class SampleResult:
    """What :func:`sample` wrote: the image paths, ``samples.jsonl`` and ``grid.png``."""

    images: list[Path]
    records_file: Path
    grid: Path | None
    warnings: list[str]


def sample(
    source: SampleSource,
    prompts: Sequence[str],
    settings: SampleSettings,
    out_dir: Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    cpu_offload: bool = False,
    progress: Any = None,
    images: Sequence[str | Path] = (),
) -> SampleResult:
    """Generate ``settings.num_images`` images per prompt with the family's pipeline and write them.

    Args:
        images: Reference images of image-editing families (``--image``): one for all prompts,
            or one per prompt.
        device: ``cuda``, ``cpu``, ... (default: CUDA when available).
        dtype: Override of the load dtype (default: the recipe's, else bfloat16 on CUDA and
            float32 on CPU).
        cpu_offload: Keep models on the CPU and move each to the GPU only while it runs
            (``enable_model_cpu_offload``): far less GPU memory, somewhat slower.  With
            ``source.quantize`` / ``source.encoder_quantize`` the quantized weights are what
            moves (see :attr:`SampleSource.quantize`).
        progress: Called as ``progress(done, total, path)`` after each image.

    Raises:
        FlowtuneError: no prompts, bad settings, a LoRA that does not fit the model.
    """
    import diffusers

    spec = source.spec
    if not prompts:
        raise FlowtuneError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    settings.check(spec)
    from flowtune.memory.quantize import check_quantize_available

    for key, mode in (("--quantize", source.quantize), ("--encoder-quantize", source.encoder_quantize)):
        if mode is not None:  # an unknown mode, or torchao missing: one line, before any model loads
            check_quantize_available(mode, key)
    if source.block_offload is not None:  # more blocks than the model has: before any model loads
        from flowtune.train.offload import check_block_offload

        check_block_offload(spec, source.pretrained, source.revision, source.block_offload, "--block-offload")
    references = pair_references(
        spec, prompts, images, (settings.width, settings.height), source.control_resize
    )
    # Before any model is downloaded or loaded, so that an unwritable --out is reported at once.
    writer = SampleWriter(
        out_dir,
        {
            "family": spec.name,
            "model": source.pretrained,
            "lora": source.lora_file,
            "checkpoint": source.checkpoint,
            "step": source.step,
            "quantize": source.quantize,
            "encoder_quantize": source.encoder_quantize,
        },
    )
    with writer.removed_if_unused():
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        avoid_cudnn_attention()  # as training does (flowtune.distributed)
        name = dtype or source.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        torch_dtype = getattr(torch, name)
        index = source.model_dir([]) / "model_index.json"
        components = [
            # Components are [library, class] pairs; other entries are pipeline config values
            # (e.g. a boolean expand_timesteps).
            k
            for k, v in json.loads(index.read_text()).items()
            if not k.startswith("_") and isinstance(v, list) and v and v[0]
        ]
        model_dir = source.model_dir(components)

        transformer = None
        if source.transformer_dir is not None:
            transformer = getattr(diffusers, spec.transformer_class).from_pretrained(
                source.transformer_dir, dtype=torch_dtype
            )
        # Loaded on the CPU first, so that a LoRA that does not fit is refused before GPU memory is used.
        pipe = load_pipeline(
            spec, model_dir, dtype=torch_dtype, device="cpu", variant=source.variant, transformer=transformer,
            first_frames=references is not None and spec.first_frame_images,
        )  # fmt: skip
        from flowtune.experts import expert_component, expert_loras, lora_expert

        warnings: list[str] = []
        # A two-expert model's LoRAs (flowtune.experts): each in its expert's transformer.
        loras = expert_loras(source.lora_file) if source.lora_file is not None else []
        for lora in loras:
            target = getattr(pipe, expert_component(lora_expert(lora)), None)
            target = target if target is not None else pipe.transformer  # add_lora refuses it
            warnings += check_lora(spec, target, lora, base_model=source.pretrained)
        _quantize(pipe, source, None if cpu_offload or device == "cpu" else device)
        for lora in loras:
            add_lora(pipe, lora, settings.lora_scale)

        encoder_class = spec.load_encoder_class()
        inputs = None
        if source.block_offload is not None and not encoder_class.text_uses_references:
            # The text encoders' work is done before the transformer comes onto the GPU.
            inputs = encode_prompts_first(pipe, spec, model_dir, prompts, settings, name, device)
        if references is not None:
            with_references = []
            for i, (prompt, files) in enumerate(zip(prompts, references, strict=True)):
                try:
                    extra = encoder_class.reference_inputs(
                        pipe, load_references(files), settings.height, settings.width, source.control_resize
                    )
                except ValueError as exc:
                    raise FlowtuneError(str(exc)) from None
                with_references.append({**(inputs[i] if inputs else {"prompt": prompt}), **extra})
            inputs = with_references
        jobs = plan_jobs(prompts, settings, inputs, references)
        fps = settings.frame_rate(spec)
        paths = []
        try:
            if source.block_offload is not None:
                place_with_block_offload(pipe, spec, source.block_offload, device)
            elif cpu_offload:
                pipe.enable_model_cpu_offload(device=device)
            else:
                pipe.to(device)
            for done, job in enumerate(jobs, start=1):
                paths.append(
                    writer.add_sample(generate_frames(pipe, job, settings, spec), job, settings, fps)
                )
                if progress is not None:
                    progress(done, len(jobs), paths[-1])
        except torch.OutOfMemoryError:
            hint = (
                "fewer --block-offload blocks, or a smaller --height/--width"
                if source.block_offload is not None
                else "a smaller --height/--width"
                if cpu_offload
                else "--cpu-offload, --block-offload N, or a smaller --height/--width"
            )
            raise FlowtuneError(
                f"out of memory on {device} after {len(paths)} of {len(jobs)} images (those are saved in "
                f"{writer.out_dir}); try {hint}"
            ) from None
        grid = writer.write_grid(columns=settings.num_images if settings.num_images > 1 else None)
        return SampleResult(paths, writer.out_dir / SAMPLES_FILE, grid, warnings)
