"""Dataset sources -> records: what to train on, listed before any image is decoded.

``data.source`` is one of three kinds, told apart by :func:`list_records`:

* **folder**: a directory of images (``.png .jpg .jpeg .webp .bmp``, any case), searched
  recursively in sorted order; hidden files and folders (name starting with ``.``) are skipped.
  An image's caption is the UTF-8 text file with the same stem next to it (``cat.png`` ->
  ``cat.txt``; ``cat.png`` and ``cat.jpg`` share it).  Symbolic links are followed.
* **jsonl**: a ``.jsonl`` manifest, one JSON object per line, e.g.
  ``{"image": "imgs/cat.png", "caption": "a cat", "style": "photo"}``.  Image paths are relative to
  the manifest's folder (or absolute); keys other than the image and the caption become metadata.
* **datasets**: a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a
  ``DatasetDict`` of which ``data.dataset_split`` is taken), or else a Hugging Face dataset name,
  loaded with ``datasets.load_dataset`` (offline this works for datasets already in the local
  cache).  Image bytes are read without decoding; other JSON-like columns become metadata.  All
  image bytes of the split are held in memory, which suits fine-tuning sets (thousands of
  images); for much larger sets export the images to a folder or a JSONL manifest.

**Edit pairs** (families whose ``FamilySpec.reference_images`` is true, e.g. FLUX.1 Kontext;
``list_records(..., references=True)``): each record also carries its control (reference)
images, in order.

* folder: ``ROOT/images/`` holds the targets and their ``.txt`` instructions (listed like a plain
  folder); ``ROOT/control/`` holds one reference per target with the same relative path and stem
  (any supported extension: ``images/cat.png`` -> ``control/cat.jpg``); ``ROOT/control_1/``,
  ``ROOT/control_2/``, ... hold further references.  A target without its reference file is a
  problem of that item.
* jsonl: the ``control`` key (``data.control_column``) holds one path or a list of paths, relative
  to the manifest like the image: ``{"image": "out.png", "control": "in.png", "caption": "make
  it blue"}``.
* datasets: not supported for edit pairs (a :class:`~flowtune.errors.FlowtuneError`).

**Videos** (video families, whose ``FamilySpec.frame_granularity`` > 0;
``list_records(..., videos=True)``): a folder also lists the videos of
:data:`~flowtune.data.video.VIDEO_EXTENSIONS` (``clip.mp4`` -> ``clip.txt``), still images being
one-frame items; a JSONL line gives a video under ``data.video_column`` (``{"video":
"clips/a.mp4", "caption": "..."}``) or an image under the image key (a video file there counts as a
video too).  Such records have :attr:`Record.video` set.  For image families, video files in a
folder and ``video`` keys in a manifest are problems of their items, and a folder holding only
videos is an error.  Datasets give still images only.

Problems with single items (an unreadable caption, a bad manifest line, a missing image file) are
returned as :class:`SourceProblem` so a run can go on with the rest; problems with the whole
source raise :class:`~flowtune.errors.FlowtuneError` with a one-line message naming
``data.source``.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flowtune.data.images import SUPPORTED_EXTENSIONS, ImageError
from flowtune.data.video import VIDEO_EXTENSIONS, is_video_path
from flowtune.errors import FlowtuneError

if TYPE_CHECKING:
    import datasets

SourceKind = Literal["folder", "jsonl", "datasets"]

NO_CAPTION_WARNING = "no caption; using an empty caption (set data.default_caption)"
"""The warning :func:`apply_caption_options` gives for an image without a caption."""

_AUTO_CAPTION_KEYS = ("caption", "text")
_STRING_DTYPES = frozenset({"string", "large_string", "string_view"})
_BINARY_DTYPES = frozenset({"binary", "large_binary", "binary_view"})
_DATASET_ROWS_PER_BATCH = 256

IMAGES_FOLDER = "images"
"""Sub-folder of an edit-pair folder source that holds the targets and their captions."""
CONTROL_FOLDER = "control"
"""Sub-folder of an edit-pair folder source that holds the first reference of each target;
further references are in ``control_1``, ``control_2``, ..."""
_CONTROL_FOLDER_PATTERN = re.compile(rf"{CONTROL_FOLDER}(?:_([1-9][0-9]*))?")


def _read_file(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from exc


def _stat_file(file: Path) -> tuple[int, int]:
    try:
        stat = file.stat()
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from exc
    return stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True)
class ControlImage:
    """One control (reference) image of an edit pair, as listed by a source."""

    path: str
    """How errors name it: the file path as given (like :attr:`Record.path`)."""
    image_file: Path
    """Absolute path of the file."""

    def read_image_bytes(self) -> bytes:
        """The encoded image.

        Raises:
            ImageError: ``"cannot read file: <reason>"`` when the file cannot be read.
        """
        return _read_file(self.image_file)

    def file_stat(self) -> tuple[int, int]:
        """``(size in bytes, mtime in ns)`` of the file.

        Raises:
            ImageError: ``"cannot read file: <reason>"`` when the file cannot be examined.
        """
        return _stat_file(self.image_file)


@dataclass(frozen=True)
class Record:
    """One training example as listed by a source, before any decoding."""

    path: str
    """How errors name it: the image file path as given (relative to the working directory if
    ``data.source`` was given relative), or ``f"{source}[{index}]"`` for a datasets row."""
    caption: str | None
    """The caption as found, stripped of surrounding whitespace; None = the item has none."""
    metadata: dict[str, Any]
    """JSON-serialisable extra fields (JSONL keys, dataset columns other than image and caption);
    ``{}`` for folders."""
    image_file: Path | None = None
    """Absolute path of the image file, for file-backed records."""
    image_bytes: bytes | None = field(default=None, repr=False)
    """The encoded image, for datasets rows that carry it.  Exactly one of the two is set."""
    controls: tuple[ControlImage, ...] = ()
    """The control (reference) images of an edit pair, in reference order (``control/`` first,
    then ``control_1/``, ...; or the JSONL list order).  Empty for plain images."""
    video: bool = False
    """The file is a video (listed for a video family); ``image_file`` is then its path."""

    def __post_init__(self) -> None:
        if (self.image_file is None) == (self.image_bytes is None):
            raise ValueError("a Record needs exactly one of image_file and image_bytes")
        if self.video and self.image_file is None:
            raise ValueError("a video Record needs image_file")

    def read_image_bytes(self) -> bytes:
        """The encoded image.

        Raises:
            ImageError: ``"cannot read file: <reason>"`` when the file cannot be read.
        """
        if self.image_bytes is not None:
            return self.image_bytes
        assert self.image_file is not None
        return _read_file(self.image_file)

    def file_stat(self) -> tuple[int, int] | None:
        """``(size in bytes, mtime in ns)`` of the image file; None for in-memory records.

        Raises:
            ImageError: ``"cannot read file: <reason>"`` when the file cannot be examined.
        """
        if self.image_file is None:
            return None
        return _stat_file(self.image_file)


@dataclass(frozen=True)
class SourceProblem:
    """An item of a source that cannot be used; the run goes on without it."""

    path: str
    """The item: an image path, ``"manifest.jsonl:LINE"`` or ``"source[index]"``."""
    reason: str
    """What is wrong, in one line."""


@dataclass(frozen=True)
class SourceListing:
    """Everything a source lists: the usable records and the items that cannot be used."""

    kind: SourceKind
    records: list[Record]
    problems: list[SourceProblem]


def list_records(
    source: str,
    *,
    image_column: str = "image",
    caption_column: str | None = None,
    dataset_split: str = "train",
    references: bool = False,
    control_column: str = "control",
    videos: bool = False,
    video_column: str = "video",
) -> SourceListing:
    """List the training examples of ``data.source`` (see the module docstring for the kinds).

    Args:
        source: A folder of images, a ``.jsonl`` manifest, a ``save_to_disk`` folder or a Hugging
            Face dataset name.
        image_column: Key (JSONL) or column (datasets) holding the image.
        caption_column: Key or column holding the caption; None = ``caption`` if present, else
            ``text``, else no captions.  Folders always take captions from ``.txt`` files.
        dataset_split: Split of a saved ``DatasetDict`` or of a dataset name.
        references: List edit pairs: every record gets its control images (the family's
            ``reference_images``).  Folders must then have the ``images/`` + ``control/`` layout.
        control_column: JSONL key holding the control image path(s), with ``references``.
        videos: List videos too (a video family): folder videos, JSONL ``video_column`` keys.
            Without it they are problems of their items.
        video_column: JSONL key holding a video path.

    Raises:
        FlowtuneError: The source as a whole cannot be used (does not exist, has no images, is an
            empty manifest or a file of another kind, lacks the image or caption column, lacks the
            edit-pair layout, ...).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            if references:
                raise _no_dataset_references(source)
            dataset = _load_saved_dataset(source, path, dataset_split)
            return _list_dataset(source, dataset, image_column, caption_column)
        return _list_edit_folder(source, path) if references else _list_folder(source, path, videos=videos)
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".jsonl":
            return _list_jsonl(
                source,
                path,
                image_column,
                caption_column,
                control_column if references else None,
                video_key=video_column,
                videos=videos,
            )
        raise FlowtuneError(
            f"data.source '{source}' is a file but not a .jsonl manifest; point data.source at a folder "
            "of images, a .jsonl manifest or a dataset"
        )
    if _looks_like_local_path(source):
        raise FlowtuneError(
            f"data.source '{source}' does not exist; check the path (a folder of images, a .jsonl "
            "manifest or a saved dataset)"
        )
    if references:
        raise _no_dataset_references(source)
    dataset = _load_hub_dataset(source, dataset_split)
    return _list_dataset(source, dataset, image_column, caption_column)


def apply_caption_options(
    caption: str | None, trigger_word: str | None, default_caption: str | None
) -> tuple[str, str | None]:
    """The caption trained on, and a warning for the user or None.

    A missing or empty caption becomes ``default_caption`` when that is set (no warning), else ""
    with the warning :data:`NO_CAPTION_WARNING`.  A trigger word is then prepended as
    ``f"{trigger_word}, {caption}"`` (just the trigger word when the caption is empty).
    """
    text = (caption or "").strip()
    warning = None
    if not text:
        default = (default_caption or "").strip()
        if default:
            text = default
        else:
            warning = NO_CAPTION_WARNING
    trigger = (trigger_word or "").strip()
    if trigger:
        text = f"{trigger}, {text}" if text else trigger
    return text, warning


# ----------------------------------------------------------------------------------------- folder


def _list_folder(source: str, root: Path, subfolder: str = "", *, videos: bool = False) -> SourceListing:
    """Images under ``root`` (recursively, sorted by relative path) with their ``.txt`` captions.

    ``subfolder``: ``root`` is this folder of ``source`` (record paths and messages name it).
    ``videos``: list videos too; otherwise each video is a problem (and only videos an error).
    """
    images: list[tuple[str, Path, Path | None]] = []  # (relative posix path, relative path, caption)
    found_videos: list[tuple[str, Path]] = []  # videos not listed (an image family)
    extensions = SUPPORTED_EXTENSIONS + (VIDEO_EXTENSIONS if videos else ())
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symbolic link back to a folder already listed
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        folder = Path(dirpath)
        relative_folder = folder.relative_to(root)
        captions = _caption_files(filenames)
        for name in filenames:
            stem, suffix = os.path.splitext(name)
            if name.startswith("."):
                continue
            if suffix.lower() not in extensions:
                if suffix.lower() in VIDEO_EXTENSIONS:
                    relative = relative_folder / name
                    found_videos.append((relative.as_posix(), relative))
                continue
            caption_name = captions.get(stem)
            relative = relative_folder / name
            images.append((relative.as_posix(), relative, folder / caption_name if caption_name else None))
    display_root = Path(source) / subfolder
    found_videos.sort(key=lambda item: item[0])
    if not images:
        where = display_root if subfolder else source
        if found_videos:
            raise FlowtuneError(
                f"data.source '{source}' holds only videos ({len(found_videos)}, e.g. "
                f"{display_root / found_videos[0][1]}), but the model family trains on still images; "
                "choose a video model family or a folder of images"
            )
        what = "images or videos" if videos else "images"
        raise FlowtuneError(
            f"data.source '{source}': no {what} ({', '.join(extensions)}) found under {where}; add "
            f"{what} there or point data.source at another folder, a .jsonl manifest or a dataset"
        )
    images.sort(key=lambda item: item[0])
    absolute_root = root.absolute()
    records: list[Record] = []
    problems: list[SourceProblem] = []
    for _, relative, caption_file in images:
        display = str(display_root / relative)
        caption = None
        if caption_file is not None:
            try:
                caption = _read_caption(caption_file)
            except _CaptionError as exc:
                problems.append(SourceProblem(display, str(exc)))
                continue
        records.append(
            Record(display, caption, {}, image_file=absolute_root / relative, video=is_video_path(relative))
        )
    problems += [SourceProblem(str(display_root / relative), _NO_VIDEOS) for _, relative in found_videos]
    return SourceListing("folder", records, problems)


def _list_edit_folder(source: str, root: Path) -> SourceListing:
    """Edit pairs: targets under ``root/images`` (as :func:`_list_folder` lists them) with their
    references from ``root/control``, ``root/control_1``, ... (same relative path and stem)."""
    folders = _control_folders(source, root)
    if not (root / IMAGES_FOLDER).is_dir() or not folders:
        raise FlowtuneError(
            f"data.source '{source}' is not an edit-pair folder: the model family trains on edit pairs "
            f"and needs {IMAGES_FOLDER}/ (target images with same-stem .txt instructions) and "
            f"{CONTROL_FOLDER}/ (a same-stem reference image per target; {CONTROL_FOLDER}_1/, "
            f"{CONTROL_FOLDER}_2/, ... for more) under {source}, or a .jsonl manifest with a control key"
        )
    targets = _list_folder(source, root / IMAGES_FOLDER, IMAGES_FOLDER)
    images_root = (root / IMAGES_FOLDER).absolute()
    absolute_root = root.absolute()
    listings: dict[Path, dict[str, list[str]]] = {}
    records: list[Record] = []
    problems = list(targets.problems)
    for record in targets.records:
        assert record.image_file is not None
        relative = record.image_file.relative_to(images_root)
        controls, problem = _edit_pair_controls(source, absolute_root, folders, relative, listings)
        if problem is not None:
            problems.append(SourceProblem(record.path, problem))
        else:
            records.append(dataclasses.replace(record, controls=controls))
    return SourceListing("folder", records, problems)


def _edit_pair_controls(
    source: str,
    root: Path,
    folders: list[str],
    relative: Path,
    listings: dict[Path, dict[str, list[str]]],
) -> tuple[tuple[ControlImage, ...], str | None]:
    """``(controls, None)`` of the target ``images/<relative>``, or ``((), problem)``."""
    controls: list[ControlImage] = []
    for folder in folders:
        found = _find_control(root / folder / relative, listings)
        shown = (Path(folder) / relative.parent / f"{relative.stem}.*").as_posix()
        if not found:
            return (), f"no control image {shown}"
        if len(found) > 1:
            return (), f"several control images {shown} ({', '.join(found)}); keep one"
        display = Path(source) / folder / relative.parent / found[0]
        controls.append(ControlImage(str(display), root / folder / relative.parent / found[0]))
    return tuple(controls), None


def _control_folders(source: str, root: Path) -> list[str]:
    """``["control", "control_1", ...]``: the reference folders of an edit-pair folder, in order
    ([] without ``control/``).  A gap in the numbering is a :class:`FlowtuneError`."""
    numbered: dict[int, str] = {}
    for name in os.listdir(root):
        match = _CONTROL_FOLDER_PATTERN.fullmatch(name)
        if match and (root / name).is_dir():
            numbered[int(match.group(1) or 0)] = name
    if 0 not in numbered:
        return []
    for index in range(1, max(numbered) + 1):
        if index not in numbered:
            raise FlowtuneError(
                f"data.source '{source}' has {numbered[max(numbered)]}/ but no {CONTROL_FOLDER}_{index}/; "
                f"reference folders are numbered {CONTROL_FOLDER}/, {CONTROL_FOLDER}_1/, "
                f"{CONTROL_FOLDER}_2/, ... without gaps"
            )
    return [numbered[i] for i in range(len(numbered))]


def _find_control(wanted: Path, listings: dict[Path, dict[str, list[str]]]) -> list[str]:
    """The names of the image files in ``wanted.parent`` that could be ``wanted``'s reference:
    ``wanted.name`` itself if it exists, else every supported image with its stem (sorted).
    ``listings`` memoises each folder's ``{stem: [names]}``."""
    folder = wanted.parent
    listing = listings.get(folder)
    if listing is None:
        listing = {}
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            names = []
        for name in names:
            stem, suffix = os.path.splitext(name)
            if (
                not name.startswith(".")
                and suffix.lower() in SUPPORTED_EXTENSIONS
                and (folder / name).is_file()
            ):
                listing.setdefault(stem, []).append(name)
        listings[folder] = listing
    found = listing.get(wanted.stem, [])
    return [wanted.name] if wanted.name in found else found


def _caption_files(filenames: list[str]) -> dict[str, str]:
    """``{stem: file name}`` of the caption files among ``filenames`` (``.txt`` before ``.TXT``)."""
    captions: dict[str, str] = {}
    for name in sorted(filenames):
        stem, suffix = os.path.splitext(name)
        if not name.startswith(".") and suffix.lower() == ".txt":
            if stem not in captions or suffix == ".txt":
                captions[stem] = name
    return captions


_NO_VIDEOS = "a video, but the model family trains on still images only"


class _CaptionError(Exception):
    """A caption file that cannot be used; the message is the one-line reason."""


def _read_caption(file: Path) -> str:
    """The stripped text of a UTF-8 caption file (a byte-order mark is accepted)."""
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise _CaptionError(f"cannot read caption file {file.name}: {exc.strerror or exc}") from exc
    offset = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[offset:].decode("utf-8")
    except UnicodeDecodeError as exc:
        position = offset + exc.start
        raise _CaptionError(
            f"caption file {file.name} is not valid UTF-8 text (byte 0x{raw[position]:02x} at "
            f"position {position})"
        ) from exc
    return text.strip()


# ------------------------------------------------------------------------------------------ jsonl


def _list_jsonl(
    source: str,
    manifest: Path,
    image_key: str,
    caption_key: str | None,
    control_key: str | None = None,
    *,
    video_key: str = "video",
    videos: bool = False,
) -> SourceListing:
    """One record per JSON object line of ``manifest``; each bad line is a problem.

    ``control_key``: list edit pairs, with the control image path(s) under this key.
    ``videos``: lines may give a video under ``video_key`` instead of an image under ``image_key``.
    """
    try:
        raw = manifest.read_bytes()
    except OSError as exc:
        raise FlowtuneError(f"data.source '{source}' cannot be read: {exc.strerror or exc}") from exc
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    display_folder = Path(source).parent
    absolute_folder = manifest.absolute().parent
    records: list[Record] = []
    problems: list[SourceProblem] = []
    objects = 0
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        objects += 1
        where = f"{source}:{lineno}"
        try:
            item = _parse_manifest_line(line, image_key, caption_key, control_key, video_key, videos)
        except _LineError as exc:
            problems.append(SourceProblem(where, str(exc)))
            continue
        image, caption, metadata, control_paths, video = item
        display, file = _manifest_path(image, display_folder, absolute_folder)
        if not file.is_file():
            problems.append(SourceProblem(display, "not a file" if file.exists() else "file not found"))
            continue
        controls = [ControlImage(*_manifest_path(c, display_folder, absolute_folder)) for c in control_paths]
        bad = next((c for c in controls if not c.image_file.is_file()), None)
        if bad is not None:
            reason = "not a file" if bad.image_file.exists() else "file not found"
            problems.append(SourceProblem(display, f"control image {bad.path}: {reason}"))
            continue
        video = videos and (video or is_video_path(file))
        records.append(
            Record(display, caption, metadata, image_file=file, controls=tuple(controls), video=video)
        )
    if objects == 0:
        raise FlowtuneError(
            f"data.source '{source}' is an empty JSONL manifest; write one JSON object per line, e.g. "
            '{"image": "cat.png", "caption": "a cat"}'
        )
    return SourceListing("jsonl", records, problems)


def _manifest_path(path: str, display_folder: Path, absolute_folder: Path) -> tuple[str, Path]:
    """``(display path, absolute file)`` of a path in a manifest (relative to its folder)."""
    expanded = Path(path).expanduser()
    if expanded.is_absolute():
        return path, expanded
    return str(display_folder / path), absolute_folder / expanded


class _LineError(Exception):
    """A manifest line that cannot be used; the message is the one-line reason."""


def _parse_manifest_line(
    line: bytes,
    image_key: str,
    caption_key: str | None,
    control_key: str | None = None,
    video_key: str = "video",
    videos: bool = False,
) -> tuple[str, str | None, dict[str, Any], list[str], bool]:
    """``(image or video path, caption or None, metadata, control paths, is a video)`` of one
    manifest line (no control paths when ``control_key`` is None; a video only with ``videos``)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _LineError(
            f"not valid UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1})"
        ) from exc
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _LineError(f"invalid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(item, dict):
        raise _LineError(f"not a JSON object (got {_json_type(item)})")
    video = image_key not in item and video_key in item
    if video and not videos:
        raise _LineError(f"'{video_key}' gives a video, but the model family trains on still images only")
    if image_key in item and video_key in item and videos:
        raise _LineError(f"both '{image_key}' and '{video_key}' keys; give one of them")
    if image_key not in item and not video:
        if videos:
            raise _LineError(
                f"no '{image_key}' key with an image path or '{video_key}' key with a video path (set "
                "data.image_column or data.video_column to the key used)"
            )
        raise _LineError(f"no '{image_key}' key with the image path (set data.image_column to the key used)")
    path_key = video_key if video else image_key
    image = item[path_key]
    if not isinstance(image, str) or not image.strip():
        raise _LineError(f"'{path_key}' must be a file path (a non-empty string), got {_json_type(image)}")
    key = caption_key or next((k for k in _AUTO_CAPTION_KEYS if k in item), _AUTO_CAPTION_KEYS[0])
    caption = item.get(key)
    if caption is not None and not isinstance(caption, str):
        raise _LineError(f"caption '{key}' must be a string, got {_json_type(caption)}")
    controls: list[str] = []
    if control_key is not None:
        if control_key not in item:
            raise _LineError(
                f"no '{control_key}' key with the control image path(s) (set data.control_column to the "
                "key used)"
            )
        controls = _control_paths(item[control_key], control_key)
    used = (path_key, key, control_key)
    metadata = {k: v for k, v in item.items() if k not in used}
    return image, caption.strip() if caption is not None else None, metadata, controls, video


def _control_paths(value: Any, key: str) -> list[str]:
    """The control paths of a manifest line's ``key``: a path, or a non-empty list of paths."""
    if isinstance(value, str) and value.strip():
        return [value]
    if isinstance(value, list) and value:
        bad = next((v for v in value if not (isinstance(v, str) and v.strip())), None)
        if bad is None:
            return value
        got = f"an array holding {_json_type(bad)}"
    else:
        got = "an empty array" if isinstance(value, list) else _json_type(value)
    raise _LineError(f"'{key}' must be a file path or a non-empty list of file paths, got {got}")


def _json_type(value: Any) -> str:
    """JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# --------------------------------------------------------------------------------------- datasets


def _no_dataset_references(source: str) -> FlowtuneError:
    return FlowtuneError(
        f"data.source '{source}': Hugging Face datasets are not supported for edit pairs (a family with "
        "reference images) yet; use a folder (images/ + control/) or a .jsonl manifest with a control key"
    )


def _is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    saved_dataset = (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    return saved_dataset or (folder / "dataset_dict.json").is_file()


def _looks_like_local_path(source: str) -> bool:
    """Whether ``source`` cannot be a Hugging Face dataset name (``name`` or ``owner/name``)."""
    return (
        Path(source).is_absolute()
        or source.startswith((".", "~", "\\"))
        or source.count("/") > 1
        or Path(source).suffix.lower() in (".jsonl", ".json", ".txt", *SUPPORTED_EXTENSIONS)
    )


def _import_datasets(source: str) -> Any:
    """The ``datasets`` module, imported only for dataset sources."""
    try:
        import datasets
    except ImportError as exc:
        raise FlowtuneError(
            f"data.source '{source}' is a Hugging Face dataset, which needs the `datasets` package: "
            "pip install datasets"
        ) from exc
    return datasets


def _load_saved_dataset(source: str, folder: Path, split: str) -> datasets.Dataset:
    """``load_from_disk``; for a ``DatasetDict``, its ``split``."""
    ds_lib = _import_datasets(source)
    try:
        loaded = ds_lib.load_from_disk(str(folder))
    except Exception as exc:
        raise FlowtuneError(
            f"data.source '{source}' looks like a saved dataset but cannot be loaded: {_one_line(exc)}"
        ) from exc
    if isinstance(loaded, ds_lib.DatasetDict):
        if split not in loaded:
            splits = ", ".join(loaded) or "none"
            raise FlowtuneError(
                f"data.source '{source}' has no split '{split}' (splits: {splits}); set data.dataset_split"
            )
        return loaded[split]
    return loaded


def _load_hub_dataset(source: str, split: str) -> datasets.Dataset:
    """``load_dataset(source, split=split)`` (the local cache serves it when offline)."""
    ds_lib = _import_datasets(source)
    try:
        loaded = ds_lib.load_dataset(source, split=split)
    except Exception as exc:
        raise FlowtuneError(
            f"data.source '{source}' is not a file or folder, and loading it as a Hugging Face dataset "
            f"failed: {_one_line(exc)}"
        ) from exc
    if not isinstance(loaded, ds_lib.Dataset):
        raise FlowtuneError(
            f"data.source '{source}' loaded as a {type(loaded).__name__}, not a dataset split; set "
            "data.dataset_split"
        )
    return loaded


def _list_dataset(
    source: str, dataset: datasets.Dataset, image_column: str, caption_column: str | None
) -> SourceListing:
    """One record per row: image bytes (or file path), caption and JSON-like columns as metadata."""
    ds_lib = _import_datasets(source)
    features = dataset.features
    columns = ", ".join(dataset.column_names)
    if image_column not in features:
        raise FlowtuneError(
            f"data.source '{source}' has no image column '{image_column}' (columns: {columns}); set "
            "data.image_column"
        )
    image_feature = features[image_column]
    if isinstance(image_feature, ds_lib.Image):
        dataset = dataset.cast_column(image_column, ds_lib.Image(decode=False))
    elif not _is_value(ds_lib, image_feature, _STRING_DTYPES | _BINARY_DTYPES):
        raise FlowtuneError(
            f"data.source '{source}': column '{image_column}' holds {image_feature}, not images or file "
            f"paths (columns: {columns}); set data.image_column"
        )
    caption_key = _dataset_caption_column(source, dataset, caption_column, ds_lib)
    used = {image_column, caption_key}
    metadata_keys = [
        c for c in dataset.column_names if c not in used and _is_json_feature(ds_lib, features[c])
    ]
    selected = [image_column, *([caption_key] if caption_key else []), *metadata_keys]
    rows = dataset.select_columns(selected).with_format(None)

    records: list[Record] = []
    problems: list[SourceProblem] = []
    index = 0
    for batch in rows.iter(batch_size=_DATASET_ROWS_PER_BATCH):
        for i, value in enumerate(batch[image_column]):
            where = f"{source}[{index}]"
            index += 1
            caption = batch[caption_key][i] if caption_key else None
            metadata = {key: batch[key][i] for key in metadata_keys}
            caption = caption.strip() if isinstance(caption, str) else None
            image_bytes, image_file, problem = _dataset_image(value)
            if problem is not None:
                problems.append(SourceProblem(where, problem))
                continue
            records.append(Record(where, caption, metadata, image_file=image_file, image_bytes=image_bytes))
    return SourceListing("datasets", records, problems)


def _dataset_caption_column(
    source: str, dataset: datasets.Dataset, caption_column: str | None, ds_lib: Any
) -> str | None:
    """The caption column: the one asked for, else ``caption``, else ``text``, else None."""
    features = dataset.features
    columns = ", ".join(dataset.column_names)
    if caption_column is not None and caption_column not in features:
        raise FlowtuneError(
            f"data.source '{source}' has no caption column '{caption_column}' (columns: {columns}); set "
            "data.caption_column (null = 'caption' or 'text' when present)"
        )
    key = caption_column or next((c for c in _AUTO_CAPTION_KEYS if c in features), None)
    if key is not None and not _is_value(ds_lib, features[key], _STRING_DTYPES):
        raise FlowtuneError(
            f"data.source '{source}': caption column '{key}' holds {features[key]}, not text "
            f"(columns: {columns}); set data.caption_column"
        )
    return key


def _dataset_image(value: Any) -> tuple[bytes | None, Path | None, str | None]:
    """``(bytes, file, problem)`` of one image cell: an undecoded ``Image`` dict, a path or bytes."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"]), None, None
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None, None
    if isinstance(value, str) and value.strip():
        file = Path(value).expanduser().absolute()
        if not file.is_file():
            return None, None, f"image file not found: {value}"
        return None, file, None
    return None, None, "no image in this row"


def _is_value(ds_lib: Any, feature: Any, dtypes: frozenset[str]) -> bool:
    """Whether ``feature`` is a plain ``Value`` of one of ``dtypes``."""
    return isinstance(feature, ds_lib.Value) and feature.dtype in dtypes


def _is_json_feature(ds_lib: Any, feature: Any) -> bool:
    """Whether every value of a column of this feature type is JSON-serialisable as it is
    (numbers, booleans, strings, labels and lists/dicts of them; not images, arrays, bytes or
    dates)."""
    if isinstance(feature, dict):
        return all(_is_json_feature(ds_lib, sub) for sub in feature.values())
    if isinstance(feature, ds_lib.Value):
        dtype = feature.dtype
        return (
            dtype in _STRING_DTYPES or dtype in ("bool", "null") or dtype.startswith(("int", "uint", "float"))
        )
    json_like = tuple(
        cls
        for cls in (getattr(ds_lib, name, None) for name in ("ClassLabel", "Json", "Translation"))
        if cls is not None
    )
    if json_like and isinstance(feature, json_like):
        return True
    list_like = tuple(
        cls
        for cls in (getattr(ds_lib, name, None) for name in ("List", "LargeList", "Sequence"))
        if cls is not None
    )
    if list_like and isinstance(feature, list_like):
        return _is_json_feature(ds_lib, feature.feature)
    return False


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type name when empty)."""
    return " ".join(str(exc).split()) or type(exc).__name__
