"""``flowtune preprocess``: encode a dataset once into the cache, incrementally.

The run, in order:

1. **List** the source's records (:mod:`flowtune.data.sources`) and apply the caption options.
2. **Plan** every item without loading any model: hash each image's bytes (remembered per file by
   size and mtime, so unchanged files are not re-read), read its size from the header, pick its
   bucket and crop at each resolution (:mod:`flowtune.data.buckets`), and derive the keys:

   - image entry key = H(image bytes, bucket, crop box, VAE files, dtype, latent_dist)
   - text entry key  = H(caption, text-encoder files, dtype, max_sequence_length,
     model.encoder_quantize when set[, control entry keys when the family's prompt embeddings
     depend on the references: ``FamilyEncoder.text_uses_references``])
   - control entry key (edit pairs) = H(control image bytes, ``data.control_resize``, the size
     it is encoded at, VAE files, dtype, latent_dist)
   - item key        = H(image entry key, text entry key[, control entry keys])
   - video families (``FamilySpec.frame_granularity`` > 0): every item is a clip, entry key =
     H(file bytes, bucket, crop box, VAE files, dtype, latent_dist, frames and, for videos,
     the source frames of the clip, which ``data.fps``, ``data.frame_sampling`` and the chunk
     index decide); still images are one-frame clips.  Videos are hashed
     and probed (frame timestamps, no decoding) by :mod:`flowtune.data.video`, the clips chosen
     by ``data.frame_sampling`` (a video too short for one clip is skipped and reported)

3. **Encode** only the entries the cache lacks, one model at a time: the family encoder loads
   the text encoders, encodes the captions and frees them, then loads the VAE for the images
   (bucket by bucket; a video family's clips through ``encode_videos``, by frame count and
   bucket), so the two are never in memory together; decoding and cropping
   run in a thread pool (up to 8 threads) ahead of the encoder.  An encoder with
   ``text_uses_references`` is handed each caption's reference images (decoded, and brought to
   the target's bucket under ``match_target``) with the captions.  The control images of edit
   pairs (families with ``FamilySpec.reference_images``) come last, size by size: each is resized
   by the encoder as the family's pipeline resizes its reference image (``kontext``: to
   ``encoder.control_size``; ``match_target``: to the target's bucket) and encoded like an image.  Entries are flushed to a new
   shard every ``shard_bytes`` or ``flush_seconds``, so a killed run resumes where it stopped.
4. **Commit** the manifest listing the items, the validation prompts' embeddings and the settings
   that made the cache; delete shards that no item uses any more; write ``errors.jsonl`` and
   print a summary.

Validation prompts (``validation.prompts``) and the empty caption are encoded too, so training
never needs the text encoders (except for families whose prompt embeddings depend on the
references, whose validation encodes its prompts with ``validation.images``: nothing is cached for
them).  :func:`check_cache` is what ``flowtune train`` calls to refuse a
cache made for another model or other settings.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from flowtune.console import PlainTable, format_bytes, make_console, styled, text_column, warning_text
from flowtune.data.buckets import CropPlan, FrameBucket, apply_crop, bucket_for
from flowtune.data.images import ImageError, load_rgb, probe_image
from flowtune.data.loader import CONTROL_FIELD
from flowtune.data.sources import ControlImage, Record, apply_caption_options, list_records
from flowtune.data.store import ERRORS_NAME, CacheStore
from flowtune.data.video import (
    ClipTooShort,
    VideoError,
    VideoInfo,
    average_fps,
    file_sha256,
    probe_video,
    read_frames,
    resolve_fps,
    resolve_frames,
    select_clips,
)
from flowtune.distributed import Processes
from flowtune.encoders import EncoderSettings, FamilyEncoder, create_encoder
from flowtune.errors import FlowtuneError
from flowtune.families import FamilySpec, get_family
from flowtune.model_files import fingerprint_components, resolve_pretrained

SHARD_BYTES = 256 * 1024**2
FLUSH_SECONDS = 30.0
# Files modified this recently are hashed again on the next run even if size and mtime agree,
# because a same-size rewrite within the filesystem's timestamp granularity would go unseen.
_RACY_NS = 2_000_000_000

# The recipe keys a cache depends on; `flowtune train` refuses a cache whose values differ.
SETTINGS_KEYS = (
    "model.family",
    "model.pretrained",
    "model.revision",
    "model.variant",
    "model.dtype",
    "model.encoder_quantize",
    "data.source",
    "data.image_column",
    "data.caption_column",
    "data.dataset_split",
    "data.trigger_word",
    "data.default_caption",
    "data.resolution",
    "data.bucket_step",
    "data.min_size",
    "data.max_sequence_length",
    "data.latent_dist",
)
# ... and, for families with reference images (edit pairs), these too.
REFERENCE_SETTINGS_KEYS = ("data.control_column", "data.control_resize")
# ... and, for video families, these (data.frames and data.fps with their defaults filled in).
VIDEO_SETTINGS_KEYS = ("data.video_column", "data.frames", "data.fps", "data.frame_sampling")
# Videos whose timestamps take more runs than this are probed again on every run instead of
# being remembered in the manifest.
_MAX_MEMO_RUNS = 256


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def resolutions(recipe: Any) -> list[int]:
    """``data.resolution`` as a list."""
    value = recipe.data.resolution
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def check_granularity(recipe: Any, encoder: FamilyEncoder) -> None:
    """``data.resolution`` and ``data.bucket_step`` against the model folder's side granularity
    (:meth:`FamilyEncoder.spatial_granularity`), which the recipe's checks cannot know when it is
    coarser than the family's.

    Raises:
        FlowtuneError: a value that is not a multiple of it.
    """
    granularity = encoder.spatial_granularity()
    values = [("data.resolution", r) for r in resolutions(recipe)]
    if recipe.data.bucket_step is not None:
        values.append(("data.bucket_step", int(recipe.data.bucket_step)))
    for key, value in values:
        if value % granularity:
            raise FlowtuneError(
                f"{key} {value} is not a multiple of {granularity}, which {recipe.model.pretrained} needs "
                f"(its VAE's downsampling x the patch size); use a multiple of {granularity}"
            )


def cache_settings(recipe: Any) -> dict[str, Any]:
    """The values of :data:`SETTINGS_KEYS` in ``recipe`` (resolution normalised to a list), and of
    :data:`REFERENCE_SETTINGS_KEYS` for edit-pair datasets and of :data:`VIDEO_SETTINGS_KEYS` for
    video families (frames and fps resolved)."""
    keys = SETTINGS_KEYS
    spec = get_family(recipe.model.family)
    if spec.uses_edit_pairs(recipe.data.edit_pairs):
        keys += REFERENCE_SETTINGS_KEYS
    if spec.frame_granularity > 0:
        keys += VIDEO_SETTINGS_KEYS
    settings: dict[str, Any] = {}
    for key in keys:
        section, name = key.split(".")
        settings[key] = recipe[section][name]
    settings["data.resolution"] = resolutions(recipe)
    if spec.frame_granularity > 0:
        settings["data.frames"] = resolve_frames(spec, recipe.data.frames)
        settings["data.fps"] = resolve_fps(spec, recipe.data.fps)
    return settings


def validation_texts(recipe: Any) -> list[str]:
    """The texts validation samples with, which preprocess encodes besides the captions: the
    validation prompts and, when validation has prompts and a negative prompt
    (:meth:`FamilySpec.cached_negative_prompt`), that; none for a family whose prompt embeddings
    depend on the references (:attr:`FamilyEncoder.text_uses_references`)."""
    v = recipe.validation
    spec = get_family(recipe.model.family)
    if spec.load_encoder_class().text_uses_references:
        return []  # validation encodes them with validation.images (FamilyEncoder.text_uses_references)
    texts = list(v.prompts)
    negative = spec.cached_negative_prompt(v.negative_prompt)
    if texts and negative is not None:
        texts.append(negative)
    return texts


def _encoder_settings(recipe: Any) -> EncoderSettings:
    return EncoderSettings(
        dtype=recipe.model.dtype,
        max_sequence_length=int(recipe.data.max_sequence_length),
        latent_dist=recipe.data.latent_dist,
        variant=recipe.model.variant,
        quantize=recipe.model.encoder_quantize,
    )


def _encoder_components(spec: FamilySpec) -> tuple[str, ...]:
    cls = spec.load_encoder_class()
    return (*cls.image_components, *cls.text_components)


@dataclass
class Problem:
    """An input that was not cached (``error``, ``skipped``) or cached with a ``warning``."""

    path: str
    reason: str
    kind: str = "error"

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind, "reason": self.reason}


@dataclass(frozen=True)
class PlannedControl:
    """One control (reference) image of an edit pair, at the size it is encoded at."""

    source: ControlImage
    sha: str
    """sha256 of the file's bytes."""
    original_size: tuple[int, int]
    """``(width, height)`` of the file (after its EXIF orientation)."""
    size: tuple[int, int]
    """``(width, height)`` it is resized to and encoded at."""
    key: str
    """The control entry key."""
    mode: str = "pipeline"
    """``data.control_resize``: how it is brought to ``size``."""

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "source": self.source.path,
            "sha256": self.sha,
            "original_size": list(self.original_size),
            "size": list(self.size),
        }


@dataclass(frozen=True)
class PlannedClip:
    """The frames of a video that make one clip."""

    info: VideoInfo
    indices: tuple[int, ...]
    """Source frame indices (into ``info.pts``), one per clip frame."""
    chunk: int
    """Index of the clip in its video (``chunks`` sampling; else 0)."""

    def to_json(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "source_frames": list(self.indices)}


@dataclass
class PlannedItem:
    """One record at one resolution (one clip of it, for a video), with its keys."""

    record: Record
    caption: str
    resolution: int
    plan: CropPlan
    image_sha: str
    image_key: str
    text_key: str
    controls: tuple[PlannedControl, ...] = ()
    frames: int = 0
    """Frames of the clip (video families; 1 for a still image); 0 = an image family's item."""
    clip: PlannedClip | None = None
    """The video frames of the clip (a video); None for an image."""

    @property
    def group(self) -> str:
        """The bucket as the summary names it (with the frame count for video families)."""
        return str(FrameBucket.of(self.plan.bucket, self.frames) if self.frames else self.plan.bucket)

    @property
    def shas(self) -> tuple[str, ...]:
        """sha256 of the image and of each control image."""
        return (self.image_sha, *(c.sha for c in self.controls))

    @property
    def key(self) -> str:
        if self.controls:
            return _hash("item", self.image_key, self.text_key, [c.key for c in self.controls])
        return _hash("item", self.image_key, self.text_key)

    def to_json(self) -> dict[str, Any]:
        controls = {"controls": [c.to_json() for c in self.controls]} if self.controls else {}
        video: dict[str, Any] = {"frames": self.frames} if self.frames else {}
        if self.clip is not None:
            video.update(self.clip.to_json())
        return {
            "key": self.key,
            "image": self.image_key,
            "text": self.text_key,
            "source": self.record.path,
            "caption": self.caption,
            "resolution": self.resolution,
            "image_sha256": self.image_sha,
            **self.plan.to_json(),
            **controls,
            **video,
            "metadata": self.record.metadata,
        }


@dataclass
class PreprocessReport:
    """What a preprocess run did (also summarised on the console)."""

    cache_dir: Path
    source_kind: str
    records: int
    items: int
    images_encoded: int
    texts_encoded: int
    images_reused: int
    texts_reused: int
    buckets: dict[str, int]
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    cache_bytes: int = 0
    shards_pruned: int = 0
    controls_encoded: int = 0
    """Control (reference) images encoded by this run (edit pairs)."""
    controls_reused: int = 0
    """Control images found in the cache already."""
    clips: bool = False
    """A video family's run: the image counts count clips (still images being one-frame clips)."""

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.kind != "warning"]


class _ImageProbe:
    """Image hashes and header sizes, remembered per file across runs by (size, mtime)."""

    def __init__(self, memo: dict[str, list[Any]]):
        self.old = memo
        self.new: dict[str, list[Any]] = {}

    def __call__(self, record: Record | ControlImage) -> tuple[str, int, int]:
        """(sha256 of the bytes, width, height after EXIF orientation); raises ImageError."""
        stat = record.file_stat()
        memo_key = str(Path(record.image_file).resolve()) if record.image_file is not None else None
        if memo_key is not None and stat is not None:
            known = self.old.get(memo_key)
            if known is not None and known[:2] == list(stat) and len(known) == 5:
                self.new[memo_key] = known
                return known[2], known[3], known[4]
        data = record.read_image_bytes()
        info = probe_image(data)
        sha = hashlib.sha256(data).hexdigest()
        if memo_key is not None and stat is not None and time.time_ns() - stat[1] > _RACY_NS:
            self.new[memo_key] = [stat[0], stat[1], sha, info.width, info.height]
        return sha, info.width, info.height

    def video(self, record: Record) -> tuple[str, VideoInfo]:
        """(sha256 of the file, its :class:`VideoInfo`); raises VideoError.  The file is read in
        blocks, never whole; the frame timestamps are remembered (when they run-length encode
        into at most :data:`_MAX_MEMO_RUNS` steps)."""
        assert record.image_file is not None
        stat = record.file_stat()
        memo_key = str(Path(record.image_file).resolve())
        known = self.old.get(memo_key)
        if known is not None and stat is not None and known[:2] == list(stat) and isinstance(known[3], dict):
            self.new[memo_key] = known
            return known[2], VideoInfo.from_json(known[3]["video"])
        sha = file_sha256(record.image_file)
        info = probe_video(record.image_file)
        compact = info.to_json()
        if stat is not None and time.time_ns() - stat[1] > _RACY_NS and len(compact[4]) <= _MAX_MEMO_RUNS:
            self.new[memo_key] = [stat[0], stat[1], sha, {"video": compact}]
        return sha, info


def _control_problem(control: ControlImage, reason: str) -> str:
    """The reason given for an item whose control image cannot be used."""
    return f"control image {control.path}: {reason}"


def _plan(
    recipe: Any,
    spec: FamilySpec,
    records: Sequence[Record],
    identity: dict[str, str],
    store: CacheStore,
    encoder: FamilyEncoder,
    *,
    rehash: bool = False,
) -> tuple[list[PlannedItem], list[Problem], dict[str, list[Any]], dict[str, str]]:
    """Plan the items of every record at every resolution (no model is loaded).

    ``rehash`` hashes every image file again instead of trusting the hashes remembered by size
    and mtime (``flowtune preprocess --verify``).

    Returns the items, the problems, the file memo to save, and ``{sha256: reason}`` of the
    images left out because an earlier run failed to decode them (remembered again).
    """
    data = recipe.data
    probe = _ImageProbe({} if rehash else store.manifest.get("files", {}))
    failures: dict[str, str] = store.manifest.get("failures", {})
    known_failures: dict[str, str] = {}
    items: list[PlannedItem] = []
    problems: list[Problem] = []
    video_family = spec.frame_granularity > 0
    frames = resolve_frames(spec, data.frames) if video_family else 0
    granularity = encoder.spatial_granularity()  # the model folder's (FamilySpec's by default)
    fps = resolve_fps(spec, data.fps) if video_family else 0.0
    for record in records:
        caption, warning = apply_caption_options(record.caption, data.trigger_word, data.default_caption)
        info: VideoInfo | None = None
        try:
            if record.video:
                sha, info = probe.video(record)
                width, height = info.width, info.height
            else:
                sha, width, height = probe(record)
        except ImageError as err:
            problems.append(Problem(record.path, str(err)))
            continue
        if sha in failures:
            problems.append(Problem(record.path, failures[sha]))
            known_failures[sha] = failures[sha]
            continue
        controls = _probe_controls(record, probe, failures, known_failures, problems)
        if controls is None:
            continue
        clips: list[PlannedClip | None] = [None]
        if info is not None and info.frame_count == 1:  # a still picture in a video file: a still
            clips = [PlannedClip(info, (0,), 0)]
        elif info is not None:
            try:
                selected = select_clips(info.times(), frames, fps, data.frame_sampling)
            except ClipTooShort as err:
                problems.append(Problem(record.path, str(err), "skipped"))
                continue
            clips = [PlannedClip(info, tuple(indices), chunk) for chunk, indices in enumerate(selected)]
            source_fps = average_fps(info)
            if data.frame_sampling != "uniform" and source_fps < fps * 0.99:
                problems.append(
                    Problem(
                        record.path,
                        f"the video has {source_fps:.3g} frames per second, fewer than data.fps={fps:g}: "
                        "its clips repeat frames",
                        "warning",
                    )
                )
        if warning:
            problems.append(Problem(record.path, warning, "warning"))
        caption_key = _hash("text", identity["text"], caption)
        for resolution in resolutions(recipe):
            plan = bucket_for(width, height, resolution, granularity, step=data.bucket_step)
            if plan.needs_upscale and data.min_size == "skip":
                problems.append(
                    Problem(
                        record.path,
                        f"{width}x{height} is smaller than its {plan.bucket} bucket at resolution "
                        f"{resolution}; set data.min_size: upscale to train on it",
                        "skipped",
                    )
                )
                continue
            planned = tuple(
                _plan_control(encoder, data.control_resize, identity, control, control_sha, size, plan)
                for control, control_sha, *size in controls
            )
            text_key = caption_key
            if encoder.text_uses_references and planned:  # the embeddings depend on the references
                text_key = _hash("text", identity["text"], caption, [control.key for control in planned])
            if not video_family:
                image_key = _hash("image", identity["image"], sha, plan.to_json())
                items.append(
                    PlannedItem(record, caption, resolution, plan, sha, image_key, text_key, planned)
                )
                continue
            for clip in clips:
                clip_frames = len(clip.indices) if clip is not None else 1
                # The source frames stand for data.fps, data.frame_sampling and the chunk index:
                # the same frames of the same file are one entry however they were chosen.
                selection: dict[str, Any] = {"frames": clip_frames}
                if clip is not None:
                    selection["source_frames"] = list(clip.indices)
                clip_key = _hash("video", identity["image"], sha, plan.to_json(), selection)
                items.append(
                    PlannedItem(
                        record, caption, resolution, plan, sha, clip_key, text_key, planned, clip_frames, clip
                    )
                )
    return items, problems, probe.new, known_failures


def _failure(item: PlannedItem, failures: dict[str, str]) -> str | None:
    """Why ``item`` cannot be cached (its image or a control image failed to decode), or None."""
    if item.image_sha in failures:
        return failures[item.image_sha]
    for control in item.controls:
        if control.sha in failures:
            return _control_problem(control.source, failures[control.sha])
    return None


def _probe_controls(
    record: Record,
    probe: _ImageProbe,
    failures: dict[str, str],
    known_failures: dict[str, str],
    problems: list[Problem],
) -> list[tuple[ControlImage, str, int, int]] | None:
    """``(control, sha256, width, height)`` of each control image of ``record``, or None (with
    the problem appended) when one cannot be read or is known to fail to decode."""
    controls = []
    for control in record.controls:
        try:
            sha, width, height = probe(control)
        except ImageError as err:
            problems.append(Problem(record.path, _control_problem(control, str(err))))
            return None
        if sha in failures:
            problems.append(Problem(record.path, _control_problem(control, failures[sha])))
            known_failures[sha] = failures[sha]
            return None
        controls.append((control, sha, width, height))
    return controls


def _plan_control(
    encoder: Any,
    mode: str,
    identity: dict[str, str],
    control: ControlImage,
    sha: str,
    original_size: Sequence[int],
    plan: CropPlan,
) -> PlannedControl:
    """The size a control image is encoded at (``data.control_resize``) and its entry key."""
    width, height = original_size
    if mode == "match_target":
        size = (plan.bucket.width, plan.bucket.height)
    else:
        size = tuple(int(side) for side in encoder.control_size(width, height))
    key = _hash("control", identity["image"], sha, mode, list(size))
    return PlannedControl(control, sha, (width, height), size, key, mode)


def _truncation_warnings(encoder: FamilyEncoder, items: Sequence[PlannedItem]) -> list[Problem]:
    """A warning per record whose caption is longer than the text encoder's limit."""
    captions = list(dict.fromkeys(item.caption for item in items))
    counts = encoder.token_counts(captions) if captions else None
    if counts is None:
        return []
    limit = encoder.settings.max_sequence_length
    too_long = {caption: n for caption, n in zip(captions, counts, strict=True) if n > limit}
    paths = dict.fromkeys((item.record.path, item.caption) for item in items if item.caption in too_long)
    return [
        Problem(
            path,
            f"caption has {too_long[caption]} tokens; the text encoder sees only the first {limit} "
            "(data.max_sequence_length)",
            "warning",
        )
        for path, caption in paths
    ]


def _reference_warnings(encoder: FamilyEncoder, items: Sequence[PlannedItem]) -> list[Problem]:
    """A warning per control image that trains but that the family's pipeline would refuse as a
    reference at sampling time (:meth:`FamilyEncoder.reference_problem`; e.g. FLUX.2's 64 px
    minimum), at the size it is handed there: its own, or the target's with ``match_target``."""
    found: dict[tuple[str, str], None] = {}
    for item in items:
        for control in item.controls:
            width, height = control.size if control.mode == "match_target" else control.original_size
            problem = encoder.reference_problem(width, height)
            if problem is not None:
                reason = (
                    f"{problem}: it trains, but the family's pipeline cannot take it as a reference "
                    f"when sampling ({width}x{height})"
                )
                found.setdefault((item.record.path, _control_problem(control.source, reason)))
    return [Problem(path, reason, "warning") for path, reason in found]


def _batched(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def _progress(console: Console) -> Progress:
    return Progress(
        text_column("{task.description}", style="bold"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        text_column("{task.fields[rate]}"),
        TimeElapsedColumn(),
        text_column("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _rate(task: Any) -> str:
    speed = task.speed
    return f"{speed:.1f} items/s" if speed else "- items/s"


class _Encoding:
    """Encodes the missing entries into the store, flushing shards as it goes."""

    def __init__(
        self,
        encoder: FamilyEncoder,
        store: CacheStore,
        *,
        batch_size: int,
        workers: int,
        shard_bytes: int,
        flush_seconds: float,
    ):
        self.encoder = encoder
        self.store = store
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self.shard_bytes = shard_bytes
        self.flush_seconds = flush_seconds

    def _maybe_flush(self) -> None:
        if (
            self.store.pending_bytes >= self.shard_bytes
            or self.store.seconds_since_flush() >= self.flush_seconds
        ):
            self.store.flush()

    def texts(self, texts: Sequence[tuple[str, TextEntry]], advance: Any) -> dict[str, str]:
        """Encode ``(key, entry)`` pairs, ``batch_size`` at a time; an encoder with
        ``text_uses_references`` gets each caption's reference images too (:func:`_decode_reference`).

        Returns ``{control image sha256: reason}`` for reference images that failed to decode
        (their captions are left unencoded; the items are dropped).
        """
        fields = list(self.encoder.text_fields)
        failed: dict[str, str] = {}
        with_references = self.encoder.text_uses_references
        for batch in _batched(texts, self.batch_size):
            if with_references:
                batch, references = self._references(batch, failed)
                out = self.encoder.encode_prompts([e.caption for _, e in batch], references) if batch else {}
            else:
                out = self.encoder.encode_prompts([e.caption for _, e in batch])
            for i, (key, _) in enumerate(batch):
                self.store.add(key, "text", {name: out[name][i] for name in fields})
            advance(len(batch))
            self._maybe_flush()
        return failed

    def _references(
        self, batch: Sequence[tuple[str, TextEntry]], failed: dict[str, str]
    ) -> tuple[list[tuple[str, TextEntry]], list[list[Any]]]:
        """The entries of ``batch`` whose reference images decode (in the thread pool), and those
        images; the others' failures are added to ``failed``."""
        prepare = self.encoder.prepare_control
        with ThreadPoolExecutor(self.workers) as pool:
            decoded = [
                list(
                    pool.map(
                        lambda c: _try_decode(functools.partial(_decode_reference, c, prepare)), e.controls
                    )
                )
                for _, e in batch
            ]
        kept, references = [], []
        for (key, entry), images in zip(batch, decoded, strict=True):
            errors = [
                (c.sha, str(img))
                for c, img in zip(entry.controls, images, strict=True)
                if isinstance(img, ImageError)
            ]
            failed.update(errors)
            if not errors:
                kept.append((key, entry))
                references.append(images)
        return kept, references

    def images(self, items: Sequence[PlannedItem], advance: Any) -> dict[str, str]:
        """Encode the image entries of ``items`` (one per distinct key), bucket by bucket.

        Returns ``{image sha256: reason}`` for images that failed to decode.
        """
        jobs = [
            _ImageJob(
                item.image_key,
                item.image_sha,
                (item.plan.bucket.width, item.plan.bucket.height),
                functools.partial(_decode_target, item),
                item.frames,
            )
            for item in items
        ]
        return self._encode_jobs(jobs, "image", list(self.encoder.image_fields), "images", advance)

    def controls(self, controls: Sequence[PlannedControl], advance: Any) -> dict[str, str]:
        """Encode control entries (one per distinct key), size by size: each control image is
        brought to its size by ``encoder.prepare_control`` (per its ``data.control_resize``
        mode) and encoded by ``encoder.encode_images``.

        Returns ``{control image sha256: reason}`` for images that failed to decode.
        """
        prepare = self.encoder.prepare_control
        jobs = [
            _ImageJob(c.key, c.sha, c.size, functools.partial(_decode_control, c, prepare)) for c in controls
        ]
        return self._encode_jobs(jobs, "control", [CONTROL_FIELD], "control images", advance)

    def _encode_jobs(
        self, jobs: Sequence[_ImageJob], kind: str, fields: list[str], what: str, advance: Any
    ) -> dict[str, str]:
        """Decode (in the thread pool, one batch ahead) and encode ``jobs`` in batches of one size;
        store ``fields`` of each as a ``kind`` entry.  Returns ``{sha256: reason}`` of failures."""
        failed: dict[str, str] = {}
        by_size: dict[tuple[int, int, int], list[_ImageJob]] = {}
        for job in jobs:
            by_size.setdefault((job.frames, *job.size), []).append(job)
        batches = [b for group in by_size.values() for b in _batched(group, self.batch_size)]

        def decode(job: _ImageJob) -> Any:
            try:
                return job.load()
            except ImageError as err:
                return err

        with ThreadPoolExecutor(self.workers) as pool:
            # Decode one batch ahead of the encoder.
            pending = [pool.map(decode, batches[0])] if batches else []
            for index, batch in enumerate(batches):
                decoded = list(pending.pop())
                if index + 1 < len(batches):
                    pending.append(pool.map(decode, batches[index + 1]))
                good = [
                    (job, img)
                    for job, img in zip(batch, decoded, strict=True)
                    if not isinstance(img, ImageError)
                ]
                for job, img in zip(batch, decoded, strict=True):
                    if isinstance(img, ImageError):
                        failed[job.sha] = str(img)
                if good:
                    generators = [torch.Generator().manual_seed(int(job.key[:15], 16)) for job, _ in good]
                    out = self._encode_image_batch(
                        [img for _, img in good], generators, batch[0].size, what, batch[0].frames
                    )
                    for i, (job, _) in enumerate(good):
                        self.store.add(job.key, kind, {name: out[name][i] for name in fields})
                advance(len(batch))
                self._maybe_flush()
        return failed

    def _encode_image_batch(
        self,
        images: list[Any],
        generators: list[torch.Generator],
        size: tuple[int, int],
        what: str,
        frames: int = 0,
    ) -> Any:
        """``encode_images`` of the images, or ``encode_videos`` of the clips (``frames`` > 0)."""
        try:
            if frames:
                return self.encoder.encode_videos(images, generators)
            return self.encoder.encode_images(images, generators)
        except torch.OutOfMemoryError:
            self.store.flush()
            shape = f"{size[0]}x{size[1]}" + (f" with {frames} frames" if frames else "")
            what = "clips" if frames else what
            raise FlowtuneError(
                f"out of memory encoding {len(images)} {what} of {shape}; lower "
                "data.encode_batch_size (everything encoded so far is saved: re-run to continue)"
            ) from None


@dataclass(frozen=True)
class TextEntry:
    """A text entry to encode: a caption (or validation prompt) and, for families whose prompt
    embeddings depend on the references (``FamilyEncoder.text_uses_references``), its item's
    control images."""

    caption: str
    controls: tuple[PlannedControl, ...] = ()


def _try_decode(load: Callable[[], Any]) -> Any:
    """``load()``, or the ImageError it raised."""
    try:
        return load()
    except ImageError as err:
        return err


def _decode_reference(control: PlannedControl, prepare: Callable[[Any, tuple[int, int], str], Any]) -> Any:
    """A control image as the family's pipeline is handed it when sampling, for its prompt
    encoding: the decoded file, or, under ``match_target``, the file brought to the target's
    bucket by the encoder (as validation and ``flowtune sample`` resize it); raises ImageError."""
    image = load_rgb(control.source.read_image_bytes())
    return prepare(image, control.size, control.mode) if control.mode == "match_target" else image


@dataclass(frozen=True)
class _ImageJob:
    """One image entry to encode: ``load()`` gives the prepared RGB image of ``size`` (w, h),
    or (``frames`` > 0, a video family) the clip: a list of ``frames`` such images."""

    key: str
    sha: str
    size: tuple[int, int]
    load: Callable[[], Any]
    frames: int = 0


def _decode_target(item: PlannedItem) -> Any:
    """The item's image, decoded and cropped to its bucket; for a video family its clip (a list of
    frames cropped to the bucket; a still image is one frame).  Raises ImageError."""
    if item.clip is not None:
        assert item.record.image_file is not None
        crop = functools.partial(_crop_frame, plan=item.plan)
        return read_frames(item.record.image_file, item.clip.info, item.clip.indices, crop)
    image = apply_crop(load_rgb(item.record.read_image_bytes()), item.plan)
    return [image] if item.frames else image


def _crop_frame(frame: Any, plan: CropPlan) -> Any:
    """A decoded video frame cropped to the bucket; a frame of another size than the video's
    first is a VideoError."""
    if frame.size != plan.original_size:
        width, height = plan.original_size
        raise VideoError(
            f"a frame is {frame.size[0]}x{frame.size[1]} pixels but the video is {width}x{height}; "
            "videos whose frame size changes are not supported"
        )
    return apply_crop(frame, plan)


def _decode_control(control: PlannedControl, prepare: Callable[[Any, tuple[int, int], str], Any]) -> Any:
    """The control image, decoded and brought to its size by the encoder; raises ImageError."""
    return prepare(load_rgb(control.source.read_image_bytes()), control.size, control.mode)


def preprocess(
    recipe: Any,
    *,
    console: Console | None = None,
    device: str | torch.device | None = None,
    shard_bytes: int = SHARD_BYTES,
    flush_seconds: float = FLUSH_SECONDS,
    verify: bool = False,
) -> PreprocessReport:
    """Bring ``data.cache_dir`` up to date with the recipe's dataset and settings.

    Shards that no longer read back (missing, truncated, a damaged header: safetensors' header
    check, no tensor data read) are dropped and the entries they held encoded again.

    Args:
        recipe: A validated recipe (:func:`flowtune.recipe.load_recipe`).
        console: Where progress and the summary go (default: a new stdout console).
        device: Where the encoders run (default: CUDA if available, else CPU).
        shard_bytes: Flush a shard once this many bytes of tensors are queued.
        flush_seconds: ... or once this many seconds passed since the last shard.
        verify: Read every tensor of every shard instead of checking the headers only, and hash
            every image file again instead of trusting the hashes remembered by size and mtime
            (``flowtune preprocess --verify``).

    Returns:
        A :class:`PreprocessReport`. ``report.items == 0`` means nothing could be cached.

    Raises:
        FlowtuneError: missing source or model, empty dataset, a locked cache, out of memory.
        KeyboardInterrupt: after saving every entry encoded so far (re-running continues).
    """
    console = console or make_console()
    start = time.perf_counter()
    group = Processes()
    if not group.is_main:
        console = Console(quiet=True)
    spec = get_family(recipe.model.family)
    if recipe.model.encoder_quantize is not None:  # torchao missing: one line, before any model loads
        from flowtune.memory.quantize import check_quantize_available

        check_quantize_available(recipe.model.encoder_quantize, "model.encoder_quantize")
    data = recipe.data
    listing = list_records(
        data.source,
        image_column=data.image_column,
        caption_column=data.caption_column,
        dataset_split=data.dataset_split,
        references=spec.uses_edit_pairs(data.edit_pairs),
        control_column=data.control_column,
        videos=spec.frame_granularity > 0,
        video_column=data.video_column,
    )
    with group.main_first():  # a download happens once; the other processes then find the files
        model_dir = resolve_pretrained(
            recipe.model.pretrained, recipe.model.revision, _encoder_components(spec), family=spec
        )
        encoder = create_encoder(spec, model_dir, _encoder_settings(recipe), device or group.device)
        # An encoder whose folder needs more than the family's components (an image-to-video
        # checkpoint's image encoder) has them fetched too.
        needed = (*encoder.image_components, *encoder.text_components)
        if set(needed) - set(_encoder_components(spec)):
            model_dir = resolve_pretrained(
                recipe.model.pretrained, recipe.model.revision, needed, family=spec
            )
            encoder = create_encoder(spec, model_dir, _encoder_settings(recipe), device or group.device)
    check_granularity(recipe, encoder)
    identity = encoder.identity()
    store = CacheStore.open(data.cache_dir, create=True)
    store.writes_manifest = group.is_main
    # The main process holds the lock for the whole group (a second preprocess is refused).
    with store.locked() if group.is_main else contextlib.nullcontext() as takeover:
        if takeover:  # a lock left by a killed preprocess
            console.print(warning_text(takeover))
        if group.is_main:  # the other processes then forget what it dropped, before planning
            store.drop_unreadable(full=verify)
        group.wait()  # every process opened the cache before any writes a shard
        store.forget_missing()
        items, problems, file_memo, known_failures = _plan(
            recipe, spec, listing.records, identity, store, encoder, rehash=verify
        )
        problems = [Problem(p.path, p.reason) for p in listing.problems] + problems
        problems += _truncation_warnings(encoder, items)
        problems += _reference_warnings(encoder, items)
        # Validation encodes its prompts itself when they depend on the references (none cached).
        prompts = [] if encoder.text_uses_references else list(dict.fromkeys(["", *validation_texts(recipe)]))
        prompt_keys = {prompt: _hash("text", identity["text"], prompt) for prompt in prompts}

        texts: dict[str, TextEntry] = {}
        for item in items:
            texts.setdefault(item.text_key, TextEntry(item.caption, item.controls))
        for prompt, key in prompt_keys.items():
            texts.setdefault(key, TextEntry(prompt))
        missing_texts = [(key, entry) for key, entry in texts.items() if not store.has(key)]
        unique_images: dict[str, PlannedItem] = {}
        for item in items:
            unique_images.setdefault(item.image_key, item)
        missing_images = [item for key, item in unique_images.items() if not store.has(key)]
        unique_controls: dict[str, PlannedControl] = {}
        for item in items:
            for control in item.controls:
                unique_controls.setdefault(control.key, control)
        missing_controls = [c for key, c in unique_controls.items() if not store.has(key)]

        failures = dict(store.manifest.get("failures", {}))
        encoded: dict[str, str] = {}
        if missing_texts or missing_images or missing_controls:
            # Each process encodes every count-th input into shards of its own.
            encoded = _encode(
                encoder,
                store,
                group.share(missing_texts),
                group.share(missing_images),
                group.share(missing_controls),
                console,
                batch_size=int(data.encode_batch_size),
                workers=min(8, os.cpu_count() or 1),
                shard_bytes=shard_bytes,
                flush_seconds=flush_seconds,
            )
        for part in group.gather(encoded):
            failures.update(part)
        if group.is_main:  # add the other processes' shards; then it writes the manifest alone
            store.recover_shards()
        # Images that failed to decode now (the ones known to fail were left out by _plan).
        failed_shas = {sha for item in items for sha in item.shas if sha in failures}
        failed_paths: dict[tuple[str, str], None] = {}
        for item in items:
            reason = _failure(item, failures)
            if reason is not None:
                failed_paths.setdefault((item.record.path, reason))
        problems.extend(Problem(path, reason) for path, reason in failed_paths)
        problems += _dropped_shard_warnings(
            store,
            {k for k, _ in missing_texts}
            | {item.image_key for item in missing_images}
            | {control.key for control in missing_controls},
        )
        images_failed = sum(1 for item in missing_images if item.image_sha in failed_shas)
        controls_failed = sum(1 for control in missing_controls if control.sha in failed_shas)
        items = [item for item in items if not failed_shas.intersection(item.shas)]

        live = (
            {item.image_key for item in items}
            | {item.text_key for item in items}
            | {control.key for item in items for control in item.controls}
            | set(prompt_keys.values())
        )
        store.manifest.update(
            {
                "settings": cache_settings(recipe),
                "encoder": {**encoder.describe(), "identity": identity, "model_dir": str(model_dir)},
                "model_fingerprint": _local_fingerprint(recipe, spec),
                "fields": {"image": encoder.image_fields, "text": encoder.text_fields},
                "items": [item.to_json() for item in items],
                "validation_prompts": {p: k for p, k in prompt_keys.items() if p},
                "empty_prompt": prompt_keys.get(""),
                "files": file_memo,
                "failures": {sha: failures[sha] for sha in sorted(failed_shas | set(known_failures))},
            }
        )
        pruned = 0
        if group.is_main:
            pruned = store.prune(live)
            store.write_manifest(complete=True)
            store.write_errors(p.to_json() for p in problems)
        group.wait()

    report = PreprocessReport(
        cache_dir=Path(data.cache_dir),
        source_kind=listing.kind,
        records=len(listing.records),
        items=len(items),
        images_encoded=len(missing_images) - images_failed,
        texts_encoded=len(missing_texts),
        images_reused=len(unique_images) - len(missing_images),
        texts_reused=len(texts) - len(missing_texts),
        buckets=dict(sorted(Counter(item.group for item in items).items())),
        problems=problems,
        seconds=time.perf_counter() - start,
        cache_bytes=store.size_bytes(),
        shards_pruned=pruned,
        controls_encoded=len(missing_controls) - controls_failed,
        controls_reused=len(unique_controls) - len(missing_controls),
        clips=spec.frame_granularity > 0,
    )
    print_summary(report, console)
    return report


def _dropped_shard_warnings(store: CacheStore, encoded: set[str]) -> list[Problem]:
    """A warning per shard dropped because it did not read back (:attr:`CacheStore.dropped`),
    saying how many of its entries were ``encoded`` again."""
    return [
        Problem(
            str(store.root / shard),
            f"cache shard {dropped.reason}: {'' if dropped.reason == 'missing' else 'removed; '}"
            f"{len(encoded.intersection(dropped.keys))} of its entries still in use were encoded again",
            "warning",
        )
        for shard, dropped in sorted(store.dropped.items())
    ]


def _encode(
    encoder: FamilyEncoder,
    store: CacheStore,
    missing_texts: Sequence[tuple[str, TextEntry]],
    missing_images: Sequence[PlannedItem],
    missing_controls: Sequence[PlannedControl],
    console: Console,
    **options: Any,
) -> dict[str, str]:
    """Encode what is missing; on any exit, save what was encoded. Returns failures.

    One model at a time is on the device: the text encoders are loaded, encode every caption and
    are freed before the VAE is loaded for the images and control images, so that preprocess
    needs the memory of the larger of them, not of both.
    """
    encoding = _Encoding(encoder, store, **options)
    failed: dict[str, str] = {}
    try:
        with _progress(console) as progress:
            if missing_texts:
                task = progress.add_task("captions", total=len(missing_texts), rate="")
                encoder.load(images=False, texts=True)
                failed = encoding.texts(
                    missing_texts,
                    lambda n: progress.update(task, advance=n, rate=_rate(progress.tasks[task])),
                )
                encoder.unload()
            if missing_images or missing_controls:
                encoder.load(images=True, texts=False)
            if missing_images:
                task = progress.add_task("images", total=len(missing_images), rate="")
                failed |= encoding.images(
                    missing_images,
                    lambda n: progress.update(task, advance=n, rate=_rate(progress.tasks[task])),
                )
            if missing_controls:
                task = progress.add_task("control images", total=len(missing_controls), rate="")
                failed |= encoding.controls(
                    missing_controls,
                    lambda n: progress.update(task, advance=n, rate=_rate(progress.tasks[task])),
                )
    finally:
        store.flush()
        encoder.unload()
    return failed


def _local_fingerprint(recipe: Any, spec: FamilySpec) -> str | None:
    """Fingerprint of the encoder files when ``model.pretrained`` is a local directory."""
    path = Path(recipe.model.pretrained).expanduser()
    return fingerprint_components(path, _encoder_components(spec)) if path.is_dir() else None


def print_summary(report: PreprocessReport, console: Console, max_listed: int = 10) -> None:
    """The end-of-run table, then the problems (first ``max_listed``) and where the rest are."""
    table = PlainTable(title="preprocess summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("source", f"{report.source_kind}: {report.records} records")
    table.add_row("items cached", str(report.items))
    edit_pairs = bool(report.controls_encoded or report.controls_reused)

    def counts(images: int, controls: int, texts: int) -> str:
        middle = f"{controls} control images, " if edit_pairs else ""
        return f"{images} {'clips' if report.clips else 'images'}, {middle}{texts} captions"

    table.add_row("encoded now", counts(report.images_encoded, report.controls_encoded, report.texts_encoded))
    table.add_row("reused", counts(report.images_reused, report.controls_reused, report.texts_reused))
    buckets = ", ".join(f"{name}: {count}" for name, count in report.buckets.items()) or "-"
    table.add_row("buckets", buckets)
    kinds = Counter(p.kind for p in report.problems)
    table.add_row(
        "problems",
        ", ".join(f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in sorted(kinds.items())) or "none",
    )
    table.add_row("cache", f"{report.cache_dir} ({format_bytes(report.cache_bytes)})")
    table.add_row("time", f"{report.seconds:.1f} s")
    console.print(table)
    for problem in report.problems[:max_listed]:
        style = "yellow" if problem.kind == "warning" else "red"
        console.print(styled((problem.kind, style), f": {problem.path}: {problem.reason}"), highlight=False)
    if report.problems:
        more = len(report.problems) - max_listed
        prefix = f"... and {more} more; " if more > 0 else ""
        console.print(
            Text(f"{prefix}all problems are listed in {report.cache_dir / ERRORS_NAME}"), highlight=False
        )


def check_cache(recipe: Any) -> CacheStore:
    """Open the recipe's cache for training, refusing one made for another model or settings.

    Every shard is checked to read back, from its header only (:meth:`CacheStore.unreadable_shards`:
    no tensor data is read, so a large cache is checked in moments).

    Raises:
        FlowtuneError: one line saying what differs and how to fix it: no cache, an interrupted
            preprocess, a setting that differs (named with both values), changed model files, a
            validation prompt that was not encoded, or a shard that is missing or damaged (named).
    """
    root = Path(recipe.data.cache_dir)
    fix = "run `flowtune preprocess` with this recipe (it re-encodes only what changed)"
    if not (root / "manifest.json").is_file():
        raise FlowtuneError(f"no preprocessed cache at {root} (data.cache_dir); {fix} first")
    store = CacheStore.open(root)
    if not store.manifest.get("complete"):
        raise FlowtuneError(
            f"the cache at {root} is incomplete (preprocess was interrupted); {fix} to finish it"
        )
    made_with = store.manifest.get("settings", {})
    wanted = cache_settings(recipe)
    differences = [
        f"{key}={json.dumps(made_with.get(key))} (the recipe has {json.dumps(value)})"
        for key, value in wanted.items()
        if made_with.get(key) != value
    ]
    if differences:
        raise FlowtuneError(
            f"the cache at {root} was made with {'; '.join(differences)}; {fix}, or set data.cache_dir "
            "to a cache made with these settings"
        )
    recorded = store.manifest.get("model_fingerprint")
    if recorded is not None and recorded != _local_fingerprint(recipe, get_family(recipe.model.family)):
        raise FlowtuneError(
            f"the VAE or text encoder files of model.pretrained {recipe.model.pretrained!r} changed since "
            f"the cache at {root} was made; {fix}"
        )
    known = store.manifest.get("validation_prompts", {})
    missing = [p for p in validation_texts(recipe) if p and p not in known]
    if missing:
        raise FlowtuneError(f"validation prompt {missing[0]!r} is not in the cache at {root}; {fix}")
    unreadable = store.unreadable_shards()
    if unreadable:
        shard, reason = next(iter(unreadable.items()))
        others = f" (and {len(unreadable) - 1} more shards)" if len(unreadable) > 1 else ""
        raise FlowtuneError(f"cache shard {root / shard} is {reason}{others}; {fix}")
    return store
