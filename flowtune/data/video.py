"""Reading video clips for video families: probing, frame selection, lazy decoding (PyAV).

A video family (``FamilySpec.frame_granularity`` > 0) trains on clips of ``data.frames`` frames
at ``data.fps`` frames per second.  Videos are handled in three steps, none of which ever holds a
whole video in memory:

1. :func:`probe_video` reads the container's packets (no decoding) for the size of the first
   video stream and the presentation timestamp of every frame (:class:`VideoInfo`).
2. :func:`select_clips` turns those timestamps into the source frames of each clip
   (``data.frame_sampling``):

   - ``head``: one clip from the start, resampled to ``fps``;
   - ``uniform``: one clip of ``frames`` frames spread evenly over the whole video (``fps`` is
     not used: the clip shows the whole video, faster than real time when it is long);
   - ``chunks``: as many consecutive, non-overlapping clips resampled to ``fps`` as fit, each
     its own training item.

   Resampling works on timestamps, so variable frame rate videos are resampled correctly: output
   frame ``k`` is the source frame on screen at time ``k / fps`` after the first frame.  A source
   slower than ``fps`` repeats frames; a faster one skips frames.
3. :func:`read_frames` decodes only up to the last frame a clip needs, seeking to the nearest
   keyframe before its first frame when the clip starts later in the video, and keeps (after an
   optional per-frame transform such as the bucket crop) only the frames selected.

Files that cannot be used raise :class:`VideoError` (an :class:`~flowtune.data.images.ImageError`,
so preprocess reports them per file like bad images): empty files, files that are not videos or
are corrupt, files with no video stream (audio only), videos without frames.

This module imports PyAV (``av``) only when a video is read, so recipe checks stay light.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flowtune.data.images import ImageError

if TYPE_CHECKING:
    from PIL import Image

    from flowtune.families import FamilySpec

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".webm", ".mov", ".mkv", ".gif")
"""File extensions of videos that a folder source picks up for video families (any case)."""

FrameSampling = Literal["head", "uniform", "chunks"]
FRAME_SAMPLINGS: tuple[str, ...] = ("head", "uniform", "chunks")

DEFAULT_FRAME_STEPS = 4
"""``data.frames: null`` means ``frame_granularity * DEFAULT_FRAME_STEPS + 1`` frames (17 for a
granularity of 4: about one second at 16 fps)."""

_EPS = 1e-6  # seconds: timestamps closer than this count as equal


class VideoError(ImageError):
    """A video that cannot be used; ``str(err)`` is a one-line reason (no path in it)."""


def is_video_path(path: str | Path) -> bool:
    """Whether the file name has one of :data:`VIDEO_EXTENSIONS`."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def resolve_frames(spec: FamilySpec, frames: int | None) -> int:
    """``data.frames`` with its default: 1 for an image family, else
    ``frame_granularity * DEFAULT_FRAME_STEPS + 1``."""
    if frames is not None:
        return int(frames)
    if spec.frame_granularity <= 0:
        return 1
    return spec.frame_granularity * DEFAULT_FRAME_STEPS + 1


def resolve_fps(spec: FamilySpec, fps: float | None) -> float:
    """``data.fps`` with its default, the family's ``fps``."""
    return float(fps) if fps is not None else float(spec.fps)


def frames_problem(spec: FamilySpec, frames: int) -> str | None:
    """Why ``frames`` is not a clip length the family takes, or None."""
    g = spec.frame_granularity
    if frames >= 1 and (frames - 1) % g == 0:
        return None
    return (
        f"must be {g} * n + 1 frames for model family {spec.name!r} ({', '.join(str(g * n + 1) for n in range(4))}, "
        f"..., {g * 20 + 1}, ...): its VAE packs {g} frames into one latent frame after the first"
    )


# ---------------------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container says, without decoding a frame."""

    width: int
    """Width of the first video stream in pixels."""
    height: int
    """Height in pixels."""
    pts: tuple[int, ...]
    """Presentation timestamps of the frames, sorted, in ``time_base`` units."""
    time_base: Fraction
    """Seconds per timestamp unit."""

    @property
    def frame_count(self) -> int:
        return len(self.pts)

    def times(self) -> list[float]:
        """Each frame's time in seconds after the first frame."""
        first = self.pts[0]
        return [float((p - first) * self.time_base) for p in self.pts]

    def to_json(self) -> list[Any]:
        """Compact JSON form: ``[width, height, [num, den], first pts, [[delta, count], ...]]``
        (the timestamp steps run-length encoded: a constant frame rate is one pair)."""
        runs: list[list[int]] = []
        for a, b in zip(self.pts, self.pts[1:], strict=False):
            delta = b - a
            if runs and runs[-1][0] == delta:
                runs[-1][1] += 1
            else:
                runs.append([delta, 1])
        tb = self.time_base
        return [self.width, self.height, [tb.numerator, tb.denominator], self.pts[0], runs]

    @classmethod
    def from_json(cls, data: Sequence[Any]) -> VideoInfo:
        """Inverse of :meth:`to_json`."""
        width, height, (num, den), first, runs = data
        pts = [int(first)]
        for delta, count in runs:
            for _ in range(int(count)):
                pts.append(pts[-1] + int(delta))
        return cls(int(width), int(height), tuple(pts), Fraction(int(num), int(den)))


def _reason(exc: BaseException) -> str:
    """One-line reason for a PyAV/FFmpeg exception."""
    import av

    if isinstance(exc, av.EOFError):
        return "the video has no frames (the file ends before its first frame: empty or truncated)"
    text = " ".join(str(getattr(exc, "strerror", None) or exc).split()) or type(exc).__name__
    return f"not a readable video (corrupt or unsupported data): {text}"


def _open(path: Path) -> Any:
    """``av.open`` for reading, with one-line errors for empty, missing and unreadable files."""
    import av

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise VideoError(f"cannot read file: {exc.strerror or exc}") from exc
    if size == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.FFmpegError as exc:
        raise VideoError(_reason(exc)) from exc
    except OSError as exc:
        raise VideoError(f"cannot read file: {exc.strerror or exc}") from exc


def _video_stream(container: Any) -> Any:
    """The first video stream that is not a cover picture (``attached_pic``: album art in an mp4
    or mkv); raises VideoError when there is none."""
    import av

    cover = av.stream.Disposition.attached_pic
    streams = [s for s in container.streams.video if not s.disposition & cover]
    if not streams:
        if container.streams.audio:
            raise VideoError("no video stream (an audio-only file)")
        raise VideoError("no video stream")
    return streams[0]


def probe_video(path: str | Path) -> VideoInfo:
    """Size and frame timestamps of the first video stream of ``path``, from its packets (nothing
    is decoded; the file is read once, packet by packet).

    Raises:
        VideoError: empty, unreadable, not a video, audio only, no frames, or a zero side.
    """
    import av

    container = _open(Path(path))
    with container:
        stream = _video_stream(container)
        width, height = stream.codec_context.width, stream.codec_context.height
        stamps: list[int | None] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:  # the final empty packet; edit-list cuts
                    continue
                stamps.append(packet.pts if packet.pts is not None else packet.dts)
        except av.FFmpegError as exc:
            if not stamps:
                raise VideoError(_reason(exc)) from exc
            # Damage after some frames: what was read is used; read_frames reports a frame it
            # cannot decode.
        time_base = stream.time_base or Fraction(1, 1000)
        if any(s is None for s in stamps):
            rate = stream.average_rate or stream.guessed_rate or Fraction(25)
            step = max(1, round(1 / (rate * time_base)))
            stamps = [i * step for i in range(len(stamps))]
    if not stamps:
        raise VideoError("the video has no frames")
    if width <= 0 or height <= 0:
        raise VideoError(f"video has a zero side ({width}x{height} pixels)")
    pts = tuple(sorted(set(s for s in stamps if s is not None)))
    return VideoInfo(width, height, pts, Fraction(time_base))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (a long video is never in memory at once)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise VideoError(f"cannot read file: {exc.strerror or exc}") from exc


# ------------------------------------------------------------------------------------ selection


class ClipTooShort(Exception):
    """The video has too few frames for one clip; ``str(err)`` says why."""


def _frame_duration(times: Sequence[float], fallback: float) -> float:
    """The usual time between frames (the median step), or ``fallback`` for a one-frame video."""
    steps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
    return steps[len(steps) // 2] if steps else fallback


def _shown_at(times: Sequence[float], t: float) -> int:
    """Index of the frame on screen at time ``t``: the last one that starts at or before it."""
    return max(0, bisect.bisect_right(times, t + _EPS) - 1)


def select_clips(times: Sequence[float], frames: int, fps: float, sampling: str) -> list[list[int]]:
    """The source frame indices of each clip of a video whose frames start at ``times``.

    Args:
        times: Each frame's time in seconds, sorted (:meth:`VideoInfo.times`).
        frames: ``data.frames``: frames per clip.
        fps: ``data.fps``: the rate clips are resampled to (``head``, ``chunks``).
        sampling: ``data.frame_sampling``: ``head``, ``uniform`` or ``chunks`` (module docstring).

    Returns:
        One list of ``frames`` indices into ``times`` per clip (``chunks``: in video order).
        Indices repeat when the source is slower than ``fps``.

    Raises:
        ClipTooShort: not enough video for one clip.
        ValueError: an unknown ``sampling`` or a non-positive ``frames`` or ``fps``.
    """
    if frames < 1 or not fps > 0:
        raise ValueError(f"frames ({frames}) and fps ({fps}) must be positive")
    count = len(times)
    if sampling == "uniform":
        if count < frames:
            raise ClipTooShort(f"too short: {count} frames, fewer than data.frames={frames}")
        if frames == 1:
            return [[0]]
        last = times[-1] - times[0]
        return [[_shown_at(times, times[0] + last * k / (frames - 1)) for k in range(frames)]]
    if sampling not in ("head", "chunks"):
        raise ValueError(f"unknown frame sampling {sampling!r}; choose one of {', '.join(FRAME_SAMPLINGS)}")
    start = times[0]
    duration = times[-1] - start + _frame_duration(times, 1.0 / fps)
    available = max(1, int(-(-(duration * fps - _EPS) // 1)))  # grid points k / fps before the end
    grid = [_shown_at(times, start + k / fps) for k in range(available if sampling == "chunks" else frames)]
    if available < frames:
        raise ClipTooShort(
            f"too short: {count} frames over {duration:.3g} s give {available} frames at data.fps={fps:g}, "
            f"fewer than data.frames={frames} ({frames / fps:.3g} s)"
        )
    if sampling == "head":
        return [grid]
    return [grid[c * frames : (c + 1) * frames] for c in range(available // frames)]


def average_fps(info: VideoInfo) -> float:
    """Frames per second over the whole video (its frame count over its duration)."""
    times = info.times()
    duration = times[-1] + _frame_duration(times, 0.0)
    return len(times) / duration if duration > 0 else 0.0


# ------------------------------------------------------------------------------------- decoding


SEEK_GAP = 32
"""Frames between one frame wanted and the next beyond which :func:`read_frames` seeks instead of
decoding through them."""


def read_frames(
    path: str | Path,
    info: VideoInfo,
    indices: Sequence[int],
    transform: Callable[[Image.Image], Image.Image] | None = None,
) -> list[Image.Image]:
    """Decode the frames ``indices`` (into ``info.pts``) of ``path`` as RGB images, in that order.

    Only what is needed is decoded: frames are decoded in order up to the last frame wanted, and
    where the next frame wanted lies more than :data:`SEEK_GAP` frames ahead (or the first one is
    not the first frame of the video) the decoder seeks to the keyframe before it instead of
    decoding what lies between.  Only the frames wanted are kept, each passed through
    ``transform`` (e.g. the bucket crop) as soon as it is decoded; a frame wanted twice is decoded
    once.  Should seeking fail to land on the frames wanted, the video is decoded from its start.
    A frame whose packet the decoder turns into no picture is replaced by the next picture.

    Raises:
        VideoError: the file cannot be read or a frame wanted cannot be decoded.
    """
    wanted = sorted(set(indices))
    if not wanted:
        return []
    if wanted[0] < 0 or wanted[-1] >= info.frame_count:
        raise ValueError(f"frame indices {wanted[0]}..{wanted[-1]} outside 0..{info.frame_count - 1}")
    found: dict[int, Image.Image] = {}
    if wanted[0] > 0 or wanted[-1] - wanted[0] > SEEK_GAP:
        _decode(Path(path), info, wanted, found, transform, seek=True)
    if len(found) < len(wanted):
        _decode(Path(path), info, wanted, found, transform, seek=False)
    if len(found) < len(wanted):
        missing = next(i for i in wanted if i not in found)
        raise VideoError(
            f"cannot decode frame {missing} of {info.frame_count} (truncated or corrupt video data)"
        )
    return [found[i] for i in indices]


class _SeekMissed(Exception):
    """A seek did not land on or before the frame wanted, or decoded frames lack timestamps."""


def _decode(
    path: Path,
    info: VideoInfo,
    wanted: list[int],
    found: dict[int, Image.Image],
    transform: Callable[[Image.Image], Image.Image] | None,
    *,
    seek: bool,
) -> None:
    """Decode into ``found`` the frames of ``wanted`` not in it yet.

    With ``seek``, jump to the keyframe before each frame wanted that lies more than
    :data:`SEEK_GAP` frames past the decoding position (and before the first one): frames are
    then told apart by their timestamps, and the attempt ends quietly at the first surprise (a
    frame without a known timestamp, a seek landing past the frame wanted, an FFmpeg error), for
    the caller to decode from the start.  Without ``seek``, decode from the start, counting
    frames where timestamps are missing."""
    import av

    index_of = {p: i for i, p in enumerate(info.pts)}
    pending = [i for i in wanted if i not in found]
    container = _open(path)
    with container:
        stream = _video_stream(container)
        frames: Any = None
        position = 0  # index of the next frame the decoder gives
        try:
            while pending:
                target = pending[0]
                if seek and (frames is None or target - position > SEEK_GAP) and target > 0:
                    container.seek(info.pts[target], stream=stream, backward=True, any_frame=False)
                    frames, landed = container.decode(stream), False
                elif frames is None:
                    frames, landed = container.decode(stream), True
                for frame in frames:
                    index = index_of.get(frame.pts) if frame.pts is not None else None
                    if index is None:
                        if seek:
                            raise _SeekMissed
                        index = position
                    if not landed:
                        if index > target:
                            raise _SeekMissed
                        landed = True
                    position = index + 1
                    # A frame wanted that the decoder never gave (a packet without a picture)
                    # is stood in for by the next frame, the one on screen after it.
                    due = [i for i in pending if i <= index and i not in found]
                    if due:
                        image = frame.to_image()
                        if transform is not None:
                            image = transform(image)
                        for i in due:
                            found[i] = image
                    if index >= target:
                        break
                else:
                    return  # the end of the video
                pending = [i for i in pending if i not in found and i >= position]
        except _SeekMissed:
            return
        except (av.FFmpegError, ValueError) as exc:  # ValueError: a pixel format without RGB conversion
            if seek:
                return
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise VideoError(f"corrupt video data at frame {position}: {reason}") from exc
