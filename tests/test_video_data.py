"""Video data for video families: probing and decoding clips (PyAV), frame selection and fps
resampling, video sources, frame buckets, recipe checks, and preprocess + loader with a fake video
family (a test-local encoder whose "latents" are 8x8 means of every 4th frame, so cached values
show which frames were taken)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from flowtune.data.buckets import FrameBucket, make_buckets, nearest_bucket
from flowtune.data.loader import BucketBatchSampler, CacheCollator, CachedDataset
from flowtune.data.preprocess import check_cache, preprocess
from flowtune.data.sources import list_records
from flowtune.data.synthetic import COLOURS, make_video_dataset, sample_motion_specs
from flowtune.data.video import (
    ClipTooShort,
    VideoError,
    VideoInfo,
    probe_video,
    read_frames,
    select_clips,
)
from flowtune.encoders.base import FamilyEncoder
from flowtune.errors import FlowtuneError
from flowtune.families import FAMILIES, FamilySpec
from flowtune.recipe import load_recipe
from flowtune.recipe.load import RecipeError
from tests.helpers import assert_user_error, cli

# ------------------------------------------------------------------------------ making clips

STEP = 15  # frame i of a test clip is filled with red = i * STEP


def _frame(i: int, size: tuple[int, int]) -> np.ndarray:
    """Frame ``i``: red = i * STEP everywhere, and a white 8x8 square moving right."""
    width, height = size
    a = np.zeros((height, width, 3), np.uint8)
    a[:, :, 0] = (i * STEP) % 256
    x = (i * 2) % max(1, width - 8)
    a[:8, x : x + 8] = 255
    return a


def make_clip(
    path: Path,
    frames: int = 16,
    size: tuple[int, int] = (32, 32),
    fps: int = 16,
    codec: str = "mpeg4",
    pts_ms: list[int] | None = None,
) -> Path:
    """A clip of ``frames`` frames (:func:`_frame`); ``pts_ms`` gives variable timestamps in ms."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        stream.codec_context.gop_size = 4
        if pts_ms is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_frame(i, size), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_gif(path: Path, frames: int = 16, size: tuple[int, int] = (32, 32), ms: int = 100) -> Path:
    """A lossless GIF of :func:`_frame` frames, ``ms`` milliseconds each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(_frame(i, size)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms, loop=0)
    return path


def make_audio_only(path: Path) -> Path:
    """A Matroska file with one PCM audio stream and no video."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_frameless(path: Path) -> Path:
    """A Matroska file with a video stream but not a single frame."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=16)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return path


def red(image: Image.Image) -> int:
    """The red level of a test frame (its bottom-left corner, away from the square)."""
    return int(np.asarray(image)[-1, 0, 0])


# ------------------------------------------------------------------------------ selection


def cfr(count: int, fps: float) -> list[float]:
    return [i / fps for i in range(count)]


@pytest.mark.parametrize(
    ("times", "frames", "fps", "sampling", "expected"),
    [
        (cfr(16, 16), 5, 16, "head", [[0, 1, 2, 3, 4]]),
        (cfr(16, 16), 5, 16, "chunks", [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]),
        (cfr(16, 16), 5, 16, "uniform", [[0, 3, 7, 11, 15]]),
        (cfr(16, 16), 1, 16, "uniform", [[0]]),
        (cfr(16, 16), 5, 8, "head", [[0, 2, 4, 6, 8]]),  # half the rate: every other frame
        (cfr(30, 30), 5, 16, "head", [[0, 1, 3, 5, 7]]),  # frame on screen at k / 16 s
        (cfr(8, 8), 5, 16, "head", [[0, 0, 1, 1, 2]]),  # a slower source repeats frames
        (cfr(10, 16), 5, 16, "chunks", [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]),  # exactly two
        # Variable frame rate: timestamps, not frame counts, decide.
        ([0, 0.04, 0.08, 0.2, 0.24, 0.26, 0.3, 0.4, 0.5], 5, 10, "head", [[0, 2, 3, 6, 7]]),
    ],
)
def test_select_clips_picks_the_frames_on_screen_at_each_step(times, frames, fps, sampling, expected):
    assert select_clips(times, frames, fps, sampling) == expected


@pytest.mark.parametrize(
    ("count", "frames", "fps", "sampling", "match"),
    [
        (16, 17, 16, "head", "16 frames over 1 s give 16 frames at data.fps=16, fewer than data.frames=17"),
        (16, 9, 8, "chunks", "give 8 frames at data.fps=8"),
        (4, 5, 16, "uniform", "4 frames, fewer than data.frames=5"),
    ],
)
def test_select_clips_refuses_videos_too_short(count, frames, fps, sampling, match):
    with pytest.raises(ClipTooShort, match=match):
        select_clips(cfr(count, 16), frames, fps, sampling)


def test_video_info_round_trips_through_its_compact_json():
    info = VideoInfo(32, 24, (0, 40, 80, 200, 240, 241), Fraction(1, 1000))
    data = info.to_json()
    assert data == [32, 24, [1, 1000], 0, [[40, 2], [120, 1], [40, 1], [1, 1]]]
    assert VideoInfo.from_json(json.loads(json.dumps(data))) == info
    assert VideoInfo(8, 8, tuple(range(0, 1600, 100)), Fraction(1, 16)).to_json()[4] == [[100, 15]]


# ------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize(
    ("name", "codec"),
    [
        ("a.mp4", "mpeg4"),
        ("b.mkv", "libx264"),
        ("c.webm", "libvpx"),
        ("d.mov", "mpeg4"),
        ("e.mp4", "libx264"),
        ("f.webm", "libvpx-vp9"),
    ],
)
def test_probe_and_read_frames_of_each_container(tmp_path, name, codec):
    path = make_clip(tmp_path / name, 16, (48, 32), codec=codec)
    info = probe_video(path)
    assert (info.width, info.height, info.frame_count) == (48, 32, 16)
    assert info.times()[:3] == pytest.approx([0, 1 / 16, 2 / 16], abs=2e-3)
    wanted = [3, 3, 9, 14]  # a repeated frame, a seek past the first keyframes
    frames = read_frames(path, info, wanted)
    assert [f.size for f in frames] == [(48, 32)] * 4
    assert [red(f) for f in frames] == pytest.approx([i * STEP for i in wanted], abs=6)
    assert frames[0] is frames[1]  # decoded once


def test_sparse_frames_are_reached_by_seeking(tmp_path, monkeypatch):
    path = make_clip(tmp_path / "long.mkv", 160, (16, 16), codec="libx264")
    info = probe_video(path)
    seeks, decoded = [], []
    original_seek, original_decode = av.container.InputContainer.seek, av.container.InputContainer.decode

    def seek(container, offset, *args, **kwargs):
        seeks.append(offset)
        return original_seek(container, offset, *args, **kwargs)

    def decode(container, *args, **kwargs):
        for frame in original_decode(container, *args, **kwargs):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(av.container.InputContainer, "seek", seek)
    monkeypatch.setattr(av.container.InputContainer, "decode", decode)
    wanted = [2, 50, 100, 150]
    frames = read_frames(path, info, wanted)
    assert [red(f) for f in frames] == pytest.approx([i * STEP % 256 for i in wanted], abs=6)
    assert seeks == [info.pts[i] for i in wanted]
    assert len(decoded) < 40  # from the keyframe (every 4th frame) before each frame wanted


def test_a_frame_the_decoder_never_gives_is_stood_in_for_by_the_next(tmp_path):
    path = make_gif(tmp_path / "a.gif", 6, ms=100)
    info = probe_video(path)
    # A timestamp between frames 2 and 3 as a packet without a picture would leave it.
    gap = VideoInfo(info.width, info.height, (*info.pts[:3], info.pts[2] + 5, *info.pts[3:]), info.time_base)
    frames = read_frames(path, gap, [1, 3, 4])
    assert [red(f) for f in frames] == [1 * STEP, 3 * STEP, 3 * STEP]


def test_gif_frames_are_exact_and_timed(tmp_path):
    path = make_gif(tmp_path / "a.gif", 10, ms=50)
    info = probe_video(path)
    assert info.frame_count == 10 and info.times()[1] == pytest.approx(0.05)
    assert [red(f) for f in read_frames(path, info, [0, 7, 9])] == [0, 7 * STEP, 9 * STEP]


def test_variable_frame_rate_clip_is_resampled_on_its_timestamps(tmp_path):
    pts = [0, 40, 80, 200, 240, 260, 300, 400, 500, 520, 540, 560, 600, 640, 700, 800]
    path = make_clip(tmp_path / "vfr.mkv", 16, codec="libx264", pts_ms=pts)
    info = probe_video(path)
    assert info.times() == pytest.approx([p / 1000 for p in pts])
    [clip] = select_clips(info.times(), 5, 10, "head")
    assert clip == [0, 2, 3, 6, 7]  # on screen at 0, 0.1, 0.2, 0.3, 0.4 s
    assert [red(f) for f in read_frames(path, info, clip)] == pytest.approx([i * STEP for i in clip], abs=6)


def test_read_frames_crops_each_frame_as_it_is_decoded(tmp_path):
    path = make_gif(tmp_path / "a.gif", 6, (40, 20))
    info = probe_video(path)
    frames = read_frames(path, info, [1, 5], lambda image: image.crop((0, 0, 16, 16)))
    assert [f.size for f in frames] == [(16, 16)] * 2


@pytest.mark.parametrize(
    ("maker", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        (lambda p: p.write_bytes(b"this is no video" * 64), "not a readable video"),
        (make_audio_only, "no video stream (an audio-only file)"),
        (make_frameless, "the video has no frames"),
    ],
)
def test_unusable_files_raise_one_line_video_errors(tmp_path, maker, reason):
    path = tmp_path / "bad.mkv"
    maker(path)
    with pytest.raises(VideoError, match=reason.replace("(", r"\(").replace(")", r"\)")) as info:
        probe_video(path)
    assert "\n" not in str(info.value)


def test_truncated_video_is_reported_not_raised_as_a_traceback(tmp_path):
    good = make_clip(tmp_path / "good.mkv", 16, codec="libx264")
    data = good.read_bytes()
    path = tmp_path / "cut.mkv"
    path.write_bytes(data[: len(data) // 2])
    try:
        info = probe_video(path)
        read_frames(path, info, [info.frame_count - 1])
    except VideoError as err:
        assert "\n" not in str(err)


# ------------------------------------------------------------------------------ sources


def test_folder_lists_videos_and_stills_for_video_families(tmp_path):
    root = tmp_path / "data"
    make_clip(root / "a.mp4")
    (root / "a.txt").write_text("a clip")
    make_gif(root / "sub" / "b.GIF")
    Image.new("RGB", (32, 32)).save(root / "c.png")
    listing = list_records(str(root), videos=True)
    kinds = {Path(r.path).name: (r.video, r.caption) for r in listing.records}
    assert kinds == {"a.mp4": (True, "a clip"), "b.GIF": (True, None), "c.png": (False, None)}
    assert listing.problems == []


def test_image_families_report_videos_and_refuse_a_folder_of_videos_only(tmp_path):
    root = tmp_path / "data"
    make_gif(root / "b.gif")
    Image.new("RGB", (32, 32)).save(root / "c.png")
    listing = list_records(str(root))
    assert [Path(r.path).name for r in listing.records] == ["c.png"]
    assert [(Path(p.path).name, p.reason) for p in listing.problems] == [
        ("b.gif", "a video, but the model family trains on still images only")
    ]
    (root / "c.png").unlink()
    with pytest.raises(FlowtuneError, match="holds only videos .* trains on still images"):
        list_records(str(root))


def test_jsonl_video_column(tmp_path):
    make_clip(tmp_path / "clips" / "a.mp4")
    Image.new("RGB", (32, 32)).save(tmp_path / "still.png")
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"video": "clips/a.mp4", "caption": "a clip", "tag": 1},
        {"image": "still.png", "caption": "a still"},
        {"image": "still.png", "video": "clips/a.mp4"},
        {"clip": "clips/a.mp4"},
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines))
    listing = list_records(str(manifest), videos=True)
    assert [(r.video, r.caption, r.metadata) for r in listing.records] == [
        (True, "a clip", {"tag": 1}),
        (False, "a still", {}),
    ]
    reasons = [p.reason for p in listing.problems]
    assert reasons[0] == "both 'image' and 'video' keys; give one of them"
    assert reasons[1].startswith("no 'image' key with an image path or 'video' key with a video path")
    images_only = list_records(str(manifest))
    assert (
        images_only.problems[0].reason
        == "'video' gives a video, but the model family trains on still images only"
    )


# ------------------------------------------------------------------------------ buckets, loader


def test_frame_buckets_keep_clip_lengths_apart():
    bucket = nearest_bucket(100, 60, make_buckets(64, 16))
    assert str(FrameBucket.of(bucket, 17)) == f"{bucket.width}x{bucket.height}x17f"
    assert FrameBucket(1, 64, 64) < FrameBucket(5, 32, 32)
    groups = [FrameBucket(5, 64, 64), FrameBucket(1, 64, 64), FrameBucket(5, 64, 64), FrameBucket(1, 64, 64)]
    sampler = BucketBatchSampler(groups, 2, seed=0)
    for batch in sampler:
        assert len({groups[i] for i in batch}) == 1


def test_collator_keeps_one_data_type_and_stacks_video_latents():
    samples = [
        {"video_latents": torch.zeros(3, 2, 4, 4), "data_type": "video", "key": str(i), "caption": ""}
        for i in range(2)
    ]
    batch = CacheCollator()(samples)
    assert batch["video_latents"].shape == (2, 3, 2, 4, 4) and batch["data_type"] == "video"
    with pytest.raises(ValueError, match="mixes data types"):
        CacheCollator()([samples[0], {**samples[1], "data_type": "image"}])


# ------------------------------------------------------------------------------ fake family


class FakeVideoEncoder(FamilyEncoder):
    """A video family's encoder without models: latent frame j is frame 4j (4 frames per latent
    frame after the first, as Wan's VAE), averaged over 8x8 pixel patches, in [0, 1]."""

    image_components = ("vae",)
    text_components = ()
    image_fields = {"video_latents": False}
    text_fields = {"text_embeddings": False}
    clips_encoded: list[tuple[int, ...]] = []

    def load(self, *, images: bool, texts: bool) -> None:
        pass

    def unload(self) -> None:
        pass

    def encode_images(self, images, generators=None):
        raise AssertionError("a video family encodes clips, never images")

    def encode_videos(self, clips, generators=None):
        arrays = [np.stack([np.asarray(frame) for frame in clip]) for clip in clips]  # [F, H, W, 3]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 4, 1, 2, 3).float() / 255  # [B, 3, F, H, W]
        b, c, f, h, w = pixels.shape
        assert (f - 1) % 4 == 0
        type(self).clips_encoded.append(tuple(pixels.shape))
        kept = pixels[:, :, ::4]
        return {"video_latents": kept.reshape(b, c, kept.shape[2], h // 8, 8, w // 8, 8).mean((4, 6))}

    def encode_prompts(self, prompts):
        return {"text_embeddings": torch.stack([torch.full((4,), float(len(p))) for p in prompts])}

    @classmethod
    def prompt_inputs(cls, text):
        return dict(text)


class _FakeVideoSpec(FamilySpec):
    def load_encoder_class(self) -> type:
        return FakeVideoEncoder


@pytest.fixture
def video_family(monkeypatch: pytest.MonkeyPatch) -> FamilySpec:
    """``model.family: flux`` becomes a video family (granularity 4, 16 fps) with the fake encoder."""
    flux = FAMILIES["flux"]
    spec = _FakeVideoSpec(**{f.name: getattr(flux, f.name) for f in dataclasses.fields(flux)})
    spec = dataclasses.replace(spec, frame_granularity=4, fps=16)
    monkeypatch.setitem(FAMILIES, "flux", spec)
    FakeVideoEncoder.clips_encoded = []
    return spec


def _recipe(tmp_path: Path, source: Path, *overrides: str):
    model = tmp_path / "model"
    (model / "vae").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model: {{family: flux, pretrained: '{model}', dtype: float32}}\n"
        f"data: {{source: '{source}', cache_dir: '{tmp_path / 'cache'}', resolution: 32,"
        " frames: 5, encode_batch_size: 2}\n"
    )
    return load_recipe(path, list(overrides))


def test_recipe_checks_frames_against_the_family(tmp_path, video_family):
    assert _recipe(tmp_path, tmp_path).data.frames == 5
    with pytest.raises(
        RecipeError, match=r"'data.frames': must be 4 \* n \+ 1 frames for model family 'flux'"
    ):
        _recipe(tmp_path, tmp_path, "data.frames=8")
    with pytest.raises(RecipeError, match="'data.fps': must be a positive number"):
        _recipe(tmp_path, tmp_path, "data.fps=0")
    assert _recipe(tmp_path, tmp_path, "data.frames=null").data.frames is None


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.frames=17", "data.frames"),
        ("data.fps=24", "data.fps"),
        ("data.frame_sampling=chunks", "data.frame_sampling"),
    ],
)
def test_image_families_refuse_video_keys(tmp_path, override, key):
    with pytest.raises(RecipeError, match=f"'{key}': model family 'flux' trains on still images"):
        _recipe(tmp_path, tmp_path, "data.frames=null", override)
    assert _recipe(tmp_path, tmp_path, "data.frames=1").data.frames == 1


@pytest.fixture
def video_folder(tmp_path: Path) -> Path:
    root = tmp_path / "videos"
    make_gif(root / "long.gif", 16, (32, 32), ms=62)  # ~16 fps: three 5-frame chunks
    (root / "long.txt").write_text("a long clip")
    make_clip(root / "wide.mp4", 8, (64, 32))
    (root / "wide.txt").write_text("a wide clip")
    make_gif(root / "short.gif", 3, ms=62)
    make_gif(root / "static.gif", 1)  # one picture: a still
    (root / "static.txt").write_text("a static gif")
    Image.fromarray(_frame(2, (32, 32))).save(root / "still.png")
    (root / "still.txt").write_text("a still")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    make_audio_only(root / "sound.mkv")
    (root / "empty.webm").write_bytes(b"")
    return root


def test_preprocess_caches_clips_and_reports_bad_videos(tmp_path, video_family, video_folder):
    recipe = _recipe(tmp_path, video_folder, "data.frame_sampling=chunks")
    report = preprocess(recipe, console=Console(quiet=True))
    errors = {
        Path(e["path"]).name: (e["kind"], e["reason"])
        for e in map(json.loads, (Path(recipe.data.cache_dir) / "errors.jsonl").read_text().splitlines())
    }
    assert errors["short.gif"][0] == "skipped" and errors["short.gif"][1].startswith("too short: 3 frames")
    assert errors["broken.mp4"][0] == "error" and "not a readable video" in errors["broken.mp4"][1]
    assert errors["sound.mkv"] == ("error", "no video stream (an audio-only file)")
    assert errors["empty.webm"] == ("error", "empty file (0 bytes)")
    assert set(errors) == {"short.gif", "broken.mp4", "sound.mkv", "empty.webm"}
    assert report.items == 3 + 1 + 1 + 1  # three chunks of long.gif, wide.mp4's head, the stills

    data = CachedDataset(recipe.data.cache_dir)
    by_source = {}
    for index, item in enumerate(data.items):
        by_source.setdefault(Path(item["source"]).name, []).append((item, data[index]))
    chunks = by_source["long.gif"]
    assert [item["chunk"] for item, _ in chunks] == [0, 1, 2]
    assert [item["source_frames"] for item, _ in chunks] == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [10, 11, 12, 13, 14],
    ]
    for item, tensors in chunks:
        assert item["frames"] == 5 and tensors["data_type"] == "video"
        latents = tensors["video_latents"]
        assert latents.shape == (3, 2, 4, 4)  # F' = (5 - 1) / 4 + 1, 32 / 8
        first, fifth = item["source_frames"][0], item["source_frames"][4]
        assert latents[0, :, -1, 0].tolist() == pytest.approx(
            [first * STEP / 255, fifth * STEP / 255], abs=1e-6
        )
    [(wide, wide_tensors)] = by_source["wide.mp4"]
    assert wide_tensors["video_latents"].shape == (3, 2, wide["bucket"][1] // 8, wide["bucket"][0] // 8)
    [(still, still_tensors)] = by_source["still.png"]
    assert still["frames"] == 1 and still_tensors["data_type"] == "image"
    assert still_tensors["video_latents"].shape == (3, 1, 4, 4)
    [(static, static_tensors)] = by_source["static.gif"]
    assert static["frames"] == 1 and static["source_frames"] == [0]
    assert static_tensors["video_latents"].shape == (3, 1, 4, 4)
    assert len({item["key"] for item in data.items}) == 6
    assert report.buckets == {"32x32x1f": 2, "32x32x5f": 3, f"{wide['bucket'][0]}x{wide['bucket'][1]}x5f": 1}

    # A batch holds one clip shape, stacked to [B, C, F', h, w].
    sampler = BucketBatchSampler(data.batch_groups, 2, seed=0)
    collate = CacheCollator(data.sequence_fields)
    for indices in sampler:
        batch = collate([data[i] for i in indices])
        assert batch["video_latents"].ndim == 5 and batch["video_latents"].shape[0] == 2
        assert batch["data_type"] == ("image" if batch["video_latents"].shape[2] == 1 else "video")
    check_cache(recipe)

    # Incremental: nothing is encoded again; another sampling changes only the video clips.
    FakeVideoEncoder.clips_encoded = []
    again = preprocess(recipe, console=Console(quiet=True))
    assert again.images_encoded == 0 and FakeVideoEncoder.clips_encoded == []
    head = _recipe(tmp_path, video_folder, "data.frame_sampling=head")
    with pytest.raises(FlowtuneError, match="data.frame_sampling"):
        check_cache(head)
    report = preprocess(head, console=Console(quiet=True))
    assert report.items == 4 and report.images_encoded == 0  # long.gif chunk 0 is its head
    assert report.images_reused == 4


def test_video_probes_are_remembered_across_runs(tmp_path, video_family, monkeypatch):
    root = tmp_path / "v"
    make_gif(root / "a.gif", 9, ms=62)
    os.utime(root / "a.gif", (1e9, 1e9))  # old enough to be remembered by size and mtime
    recipe = _recipe(tmp_path, root)
    assert preprocess(recipe, console=Console(quiet=True)).items == 1
    [memo] = json.loads((Path(recipe.data.cache_dir) / "manifest.json").read_text())["files"].values()
    assert memo[3] == {"video": [32, 32, [1, 100], 0, [[6, 8]]]}

    def no_probe(*args):
        raise AssertionError("probed again")

    monkeypatch.setattr("flowtune.data.preprocess.probe_video", no_probe)
    monkeypatch.setattr("flowtune.data.preprocess.file_sha256", no_probe)
    again = preprocess(recipe, console=Console(quiet=True))
    assert again.items == 1 and again.images_encoded == 0


class FakeImageEncoder(FakeVideoEncoder):
    """The fake encoder of an image family: 8x8 means of the image."""

    image_fields = {"image_latents": False}

    def encode_images(self, images, generators=None):
        pixels = torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float()
        b, c, h, w = pixels.shape
        return {"image_latents": pixels.reshape(b, c, h // 8, 8, w // 8, 8).mean((3, 5))}


class _FakeImageSpec(FamilySpec):
    def load_encoder_class(self) -> type:
        return FakeImageEncoder


def test_image_family_cache_keys_and_manifest_are_unchanged(tmp_path, monkeypatch):
    flux = FAMILIES["flux"]
    monkeypatch.setitem(
        FAMILIES, "flux", _FakeImageSpec(**{f.name: getattr(flux, f.name) for f in dataclasses.fields(flux)})
    )
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(_frame(3, (48, 32))).save(root / "a.png")
    (root / "a.txt").write_text("an image")
    recipe = _recipe(tmp_path, root, "data.frames=null")
    preprocess(recipe, console=Console(quiet=True))
    manifest = json.loads((Path(recipe.data.cache_dir) / "manifest.json").read_text())
    [item] = manifest["items"]

    def key(*parts):
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    identity = manifest["encoder"]["identity"]
    sha = hashlib.sha256((root / "a.png").read_bytes()).hexdigest()
    plan = {k: item[k] for k in ("bucket", "original_size", "crop_box", "scale")}
    assert item["image"] == key("image", identity["image"], sha, plan)
    assert item["key"] == key("item", item["image"], key("text", identity["text"], "an image"))
    assert "frames" not in item and "source_frames" not in item
    assert not any(k in manifest["settings"] for k in ("data.frames", "data.fps", "data.frame_sampling"))
    assert "data_type" not in CachedDataset(recipe.data.cache_dir)[0]


def test_uniform_sampling_spreads_frames_over_the_video(tmp_path, video_family):
    root = tmp_path / "v"
    make_gif(root / "a.gif", 13, ms=62)
    recipe = _recipe(tmp_path, root, "data.frame_sampling=uniform")
    preprocess(recipe, console=Console(quiet=True))
    [item] = CachedDataset(recipe.data.cache_dir).items
    assert item["source_frames"] == [0, 3, 6, 9, 12]


def _centroid(image: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    """(x, y) centre of the pixels that are not the background colour."""
    mask = np.abs(np.asarray(image).astype(int) - np.array(background)).sum(axis=2) > 60
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_make_video_dataset_moves_the_shape_its_caption_names(tmp_path):
    paths = make_video_dataset(tmp_path / "a", 4, sizes=[(64, 64)], frames=9, fps=8, video_format="gif")
    again = make_video_dataset(tmp_path / "b", 4, sizes=[(64, 64)], frames=9, fps=8, video_format="gif")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    for path, spec in zip(paths, sample_motion_specs(4), strict=True):
        assert path.with_suffix(".txt").read_text() == spec.caption() + "\n"
        info = probe_video(path)
        assert info.frame_count == 9 and info.times()[1] == pytest.approx(1 / 8, abs=0.01)
        first, last = read_frames(path, info, [0, 8])
        background = COLOURS[spec.shape.background]
        moved = _centroid(last, background) - _centroid(first, background)
        direction = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}[spec.motion]
        assert moved @ np.array(direction) > 20  # travelled about 0.4 of 64 px that way
    mp4 = make_video_dataset(tmp_path / "c", 2, frames=5)
    assert [probe_video(p).frame_count for p in mp4] == [5, 5]


def test_make_dataset_video_command(tmp_path):
    made = cli(
        "make-dataset", "clips", "--video", "--count", "2", "--frames", "5", "--size", "32x32", cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == [
        "0000.mp4",
        "0000.txt",
        "0001.mp4",
        "0001.txt",
    ]
    assert probe_video(tmp_path / "clips" / "0000.mp4").frame_count == 5
    assert_user_error(
        cli("make-dataset", "other", "--video", "--edit-pairs", cwd=tmp_path), "--video cannot be combined"
    )
    assert_user_error(
        cli("make-dataset", "odd", "--video", "--size", "33x32", cwd=tmp_path), "mp4 clips need even sides"
    )
