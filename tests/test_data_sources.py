"""Dataset sources: folders, JSONL manifests and `datasets` data -> records, problems and errors."""

from __future__ import annotations

import codecs
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowtune.data.images import ImageError, load_rgb
from flowtune.data.sources import (
    NO_CAPTION_WARNING,
    Record,
    SourceListing,
    SourceProblem,
    apply_caption_options,
    list_records,
)
from flowtune.errors import FlowtuneError
from tests.helpers import save_image, write


def by_path(listing: SourceListing) -> dict[str, Record]:
    return {record.path: record for record in listing.records}


# ------------------------------------------------------------------------------------------ folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    save_image(root / "a.png", (40, 20))
    write(root / "a.txt", "  a red cat \n")
    save_image(root / "b.JPG", (20, 50))  # no caption; upper-case extension
    save_image(root / "sub" / "c.webp", (30, 30))
    write(root / "sub" / "c.txt", "")  # empty caption file: caption ""
    save_image(root / "sub" / "deeper" / "d.bmp", (80, 60))
    write(root / "sub" / "deeper" / "d.txt", codecs.BOM_UTF8 + "ein Hund mit Schleife – größer".encode())
    save_image(root / "x.png")
    save_image(root / "x.jpg")
    write(root / "x.txt", "shared caption")
    save_image(root / "bad.png")
    write(root / "bad.txt", b"\xff\xfe bad")
    save_image(root / ".hidden" / "e.png")
    save_image(root / ".f.png")
    write(root / "notes.md", "not an image")
    write(root / "caption-only.txt", "orphan caption")
    return root


def test_folder_lists_images_recursively_in_sorted_order(image_folder: Path):
    listing = list_records(str(image_folder))
    assert listing.kind == "folder"
    relative = [Path(r.path).relative_to(image_folder).as_posix() for r in listing.records]
    assert relative == ["a.png", "b.JPG", "sub/c.webp", "sub/deeper/d.bmp", "x.jpg", "x.png"]
    for record in listing.records:
        assert record.image_file is not None and record.image_file.is_absolute()
        assert record.image_file.is_file() and record.image_bytes is None
        assert record.metadata == {}


def test_folder_captions_come_from_same_stem_text_files(image_folder: Path):
    captions = {Path(r.path).name: r.caption for r in list_records(str(image_folder)).records}
    assert captions == {
        "a.png": "a red cat",
        "b.JPG": None,
        "c.webp": "",
        "d.bmp": "ein Hund mit Schleife – größer",  # the byte-order mark is dropped
        "x.jpg": "shared caption",
        "x.png": "shared caption",
    }


def test_folder_caption_that_is_not_utf8_drops_the_image_with_a_problem(image_folder: Path):
    listing = list_records(str(image_folder))
    assert listing.problems == [
        SourceProblem(
            path=str(image_folder / "bad.png"),
            reason="caption file bad.txt is not valid UTF-8 text (byte 0xff at position 0)",
        )
    ]
    assert str(image_folder / "bad.png") not in by_path(listing)


def test_folder_bad_byte_position_counts_the_bom(tmp_path: Path):
    save_image(tmp_path / "one.png")
    write(tmp_path / "one.txt", codecs.BOM_UTF8 + b"ok \xc3\x28")
    (problem,) = list_records(str(tmp_path)).problems
    assert problem.reason == "caption file one.txt is not valid UTF-8 text (byte 0xc3 at position 6)"


def test_folder_paths_stay_relative_when_the_source_is(image_folder: Path, monkeypatch):
    monkeypatch.chdir(image_folder.parent)
    listing = list_records("data")
    assert listing.records[0].path == os.path.join("data", "a.png")
    assert listing.records[0].image_file == image_folder / "a.png"
    assert listing.records[0].read_image_bytes() == (image_folder / "a.png").read_bytes()


def test_folder_follows_symbolic_links_without_looping(tmp_path: Path):
    save_image(tmp_path / "real" / "a.png")
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "real", target_is_directory=True)
    listing = list_records(str(tmp_path / "real"))
    assert [Path(r.path).name for r in listing.records] == ["a.png"]


def test_record_reads_bytes_and_stat(image_folder: Path):
    record = by_path(list_records(str(image_folder)))[str(image_folder / "a.png")]
    data = record.read_image_bytes()
    assert data == (image_folder / "a.png").read_bytes()
    stat = os.stat(image_folder / "a.png")
    assert record.file_stat() == (stat.st_size, stat.st_mtime_ns)
    assert load_rgb(data).size == (40, 20)


def test_record_of_a_vanished_file_raises_image_error(tmp_path: Path):
    record = Record(path="gone.png", caption=None, metadata={}, image_file=tmp_path / "gone.png")
    with pytest.raises(ImageError, match=r"^cannot read file: No such file or directory$"):
        record.read_image_bytes()
    with pytest.raises(ImageError, match=r"^cannot read file: "):
        record.file_stat()


def test_record_needs_exactly_one_image():
    with pytest.raises(ValueError):
        Record(path="x", caption=None, metadata={})
    with pytest.raises(ValueError):
        Record(path="x", caption=None, metadata={}, image_file=Path("x.png"), image_bytes=b"x")
    in_memory = Record(path="ds[0]", caption=None, metadata={}, image_bytes=b"abc")
    assert in_memory.read_image_bytes() == b"abc" and in_memory.file_stat() is None


def test_broken_files_are_listed_and_fail_one_by_one_when_decoded(tmp_path: Path):
    good = save_image(tmp_path / "good.png")
    write(tmp_path / "empty.png", b"")
    write(tmp_path / "text.jpg", "just some text pretending to be a JPEG")
    png = good.read_bytes()
    write(tmp_path / "truncated.png", png[: len(png) // 2])
    reasons = {}
    for record in list_records(str(tmp_path)).records:
        try:
            load_rgb(record.read_image_bytes())
            reasons[Path(record.path).name] = "ok"
        except ImageError as exc:
            reasons[Path(record.path).name] = str(exc).split(":")[0]
    assert reasons == {
        "empty.png": "empty file (0 bytes)",
        "good.png": "ok",
        "text.jpg": "not an image file (cannot identify image format)",
        "truncated.png": "truncated or corrupt image data",
    }


def test_folder_without_images_is_an_error(tmp_path: Path):
    write(tmp_path / "readme.txt", "no pictures here")
    save_image(tmp_path / ".hidden.png")
    with pytest.raises(FlowtuneError, match=r"data\.source .*no images \(\.png, \.jpg, .*\) found under"):
        list_records(str(tmp_path))


def test_missing_path_is_an_error(tmp_path: Path):
    with pytest.raises(FlowtuneError, match=r"data\.source '.*missing' does not exist"):
        list_records(str(tmp_path / "missing"))


def test_a_file_that_is_not_a_manifest_is_an_error(tmp_path: Path):
    image = save_image(tmp_path / "one.png")
    with pytest.raises(FlowtuneError, match=r"data\.source .* is a file but not a \.jsonl manifest"):
        list_records(str(image))


# ------------------------------------------------------------------------------------------- jsonl


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    save_image(data / "imgs" / "a.png", (40, 20))
    save_image(data / "imgs" / "b.png", (20, 40))
    elsewhere = save_image(tmp_path / "elsewhere" / "c.png", (25, 25))
    lines = [
        json.dumps({"image": "imgs/a.png", "caption": " a cat ", "style": "photo", "score": 7.5}),
        "",
        json.dumps({"image": "imgs/b.png", "text": "a dog", "tags": ["x", "y"]}),
        json.dumps({"image": str(elsewhere), "prompt": "a bird"}),
        '{"image": "imgs/a.png", "caption": ',  # line 5: bad JSON
        json.dumps(["imgs/a.png", "a list"]),  # line 6: not an object
        json.dumps({"caption": "no image key"}),  # line 7
        json.dumps({"image": "imgs/missing.png", "caption": "gone"}),  # line 8
        json.dumps({"image": "imgs/a.png", "caption": 3}),  # line 9: caption not a string
        json.dumps({"image": 42}),  # line 10: image not a path
        "   ",
    ]
    return write(data / "train.jsonl", "\n".join(lines) + "\n")


def test_jsonl_records_captions_and_metadata(manifest: Path, tmp_path: Path):
    listing = list_records(str(manifest))
    assert listing.kind == "jsonl"
    data = manifest.parent
    assert [r.path for r in listing.records] == [
        str(data / "imgs" / "a.png"),
        str(data / "imgs" / "b.png"),
        str(tmp_path / "elsewhere" / "c.png"),
    ]
    a, b, c = listing.records
    assert (a.caption, a.metadata) == ("a cat", {"style": "photo", "score": 7.5})
    assert (b.caption, b.metadata) == ("a dog", {"tags": ["x", "y"]})  # "text" when no "caption"
    assert (c.caption, c.metadata) == (None, {"prompt": "a bird"})
    assert a.image_file == data / "imgs" / "a.png" and load_rgb(a.read_image_bytes()).size == (40, 20)


def test_jsonl_bad_lines_are_problems(manifest: Path):
    problems = list_records(str(manifest)).problems
    where = str(manifest)
    assert [p.path for p in problems] == [
        f"{where}:5",
        f"{where}:6",
        f"{where}:7",
        str(manifest.parent / "imgs" / "missing.png"),
        f"{where}:9",
        f"{where}:10",
    ]
    reasons = [p.reason for p in problems]
    assert reasons[0].startswith("invalid JSON: ")
    assert reasons[1] == "not a JSON object (got an array)"
    assert "no 'image' key" in reasons[2] and "data.image_column" in reasons[2]
    assert reasons[3] == "file not found"
    assert reasons[4] == "caption 'caption' must be a string, got a number"
    assert reasons[5] == "'image' must be a file path (a non-empty string), got a number"
    assert all("\n" not in r for r in reasons)


def test_jsonl_paths_are_relative_to_the_manifest_and_stay_relative(manifest: Path, monkeypatch):
    monkeypatch.chdir(manifest.parent.parent)
    listing = list_records(os.path.join("data", "train.jsonl"))
    assert listing.records[0].path == os.path.join("data", "imgs", "a.png")
    assert listing.records[0].image_file == manifest.parent / "imgs" / "a.png"
    assert listing.problems[0].path == os.path.join("data", "train.jsonl") + ":5"


def test_jsonl_explicit_columns(tmp_path: Path):
    save_image(tmp_path / "a.png")
    lines = [
        {"file": "a.png", "prompt": "explicit", "caption": "kept as metadata"},
        {"file": "a.png", "caption": "no prompt on this line"},
    ]
    write(tmp_path / "m.jsonl", "\n".join(json.dumps(line) for line in lines))
    listing = list_records(str(tmp_path / "m.jsonl"), image_column="file", caption_column="prompt")
    assert [(r.caption, r.metadata) for r in listing.records] == [
        ("explicit", {"caption": "kept as metadata"}),
        (None, {"caption": "no prompt on this line"}),
    ]
    assert listing.problems == []


def test_jsonl_with_bom_and_crlf_line_ends(tmp_path: Path):
    save_image(tmp_path / "a.png")
    write(tmp_path / "m.jsonl", codecs.BOM_UTF8 + b'{"image": "a.png", "caption": "x"}\r\n\r\n')
    listing = list_records(str(tmp_path / "m.jsonl"))
    assert [r.caption for r in listing.records] == ["x"] and listing.problems == []


def test_empty_jsonl_is_an_error(tmp_path: Path):
    write(tmp_path / "empty.jsonl", "\n  \n")
    with pytest.raises(FlowtuneError, match=r"data\.source .*empty\.jsonl' is an empty JSONL manifest"):
        list_records(str(tmp_path / "empty.jsonl"))


# ---------------------------------------------------------------------------------------- datasets


@pytest.fixture
def datasets():
    """The `datasets` package (an optional dependency: these tests skip without it)."""
    return pytest.importorskip("datasets")


def pil_images(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (20 + 10 * i, 30), (40 * i, 100, 200)) for i in range(count)]


def test_saved_dataset_gives_in_memory_records(tmp_path: Path, datasets):
    dataset = datasets.Dataset.from_dict(
        {
            "image": pil_images(3),
            "caption": [" first ", None, "third"],
            "score": [1.5, 2.0, 3.25],
            "tags": [["a"], [], ["b", "c"]],
            "info": [{"source": "x", "n": 1}, {"source": "y", "n": 2}, {"source": "z", "n": 3}],
            "mask": pil_images(3),  # another image column: not metadata
            "raw": [b"\x00", b"\x01", b"\x02"],  # bytes: not JSON, not metadata
        }
    ).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "ds"))
    source = str(tmp_path / "ds")
    listing = list_records(source)
    assert listing.kind == "datasets" and listing.problems == []
    assert [r.path for r in listing.records] == [f"{source}[0]", f"{source}[1]", f"{source}[2]"]
    assert [r.caption for r in listing.records] == ["first", None, "third"]
    assert listing.records[2].metadata == {"score": 3.25, "tags": ["b", "c"], "info": {"source": "z", "n": 3}}
    for i, record in enumerate(listing.records):
        assert record.image_file is None and record.file_stat() is None
        json.dumps(record.metadata)
        image = load_rgb(record.read_image_bytes())
        assert image.size == (20 + 10 * i, 30)
        assert np.asarray(image)[0, 0].tolist() == [40 * i, 100, 200]


def test_saved_dataset_from_file_paths_with_custom_columns(tmp_path: Path, datasets):
    paths = [str(save_image(tmp_path / "src" / f"{i}.png", (16 + i, 16))) for i in range(2)]
    dataset = datasets.Dataset.from_dict({"picture": paths, "prompt": ["p0", "p1"], "caption": ["c0", "c1"]})
    dataset.cast_column("picture", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    listing = list_records(str(tmp_path / "ds"), image_column="picture", caption_column="prompt")
    assert [r.caption for r in listing.records] == ["p0", "p1"]
    assert [r.metadata for r in listing.records] == [{"caption": "c0"}, {"caption": "c1"}]
    assert [load_rgb(r.read_image_bytes()).size for r in listing.records] == [(16, 16), (17, 16)]


def test_dataset_string_column_is_a_path(tmp_path: Path, datasets):
    path = save_image(tmp_path / "one.png", (21, 13))
    dataset = datasets.Dataset.from_dict(
        {"file": [str(path), str(tmp_path / "nope.png")], "text": ["t", "u"]}
    )
    dataset.save_to_disk(str(tmp_path / "ds"))
    source = str(tmp_path / "ds")
    listing = list_records(source, image_column="file")
    (record,) = listing.records
    assert record.image_file == path and record.caption == "t" and record.metadata == {}
    assert record.path == f"{source}[0]" and record.file_stat() is not None
    assert listing.problems == [
        SourceProblem(f"{source}[1]", f"image file not found: {tmp_path / 'nope.png'}")
    ]


def test_dataset_dict_takes_the_requested_split(tmp_path: Path, datasets):
    dataset_dict = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"image": pil_images(2), "text": ["a", "b"]}),
            "validation": datasets.Dataset.from_dict({"image": pil_images(1), "text": ["v"]}),
        }
    )
    dataset_dict.save_to_disk(str(tmp_path / "dd"))
    assert [r.caption for r in list_records(str(tmp_path / "dd")).records] == ["a", "b"]
    validation = list_records(str(tmp_path / "dd"), dataset_split="validation")
    assert [r.caption for r in validation.records] == ["v"]
    with pytest.raises(
        FlowtuneError, match=r"no split 'test' \(splits: train, validation\); set data\.dataset_split"
    ):
        list_records(str(tmp_path / "dd"), dataset_split="test")


@pytest.fixture
def saved_dataset(tmp_path: Path, datasets) -> str:
    dataset = datasets.Dataset.from_dict({"img": pil_images(1), "label": [3], "notes": ["n"]})
    dataset.save_to_disk(str(tmp_path / "ds"))
    return str(tmp_path / "ds")


def test_dataset_missing_image_column_names_the_columns(saved_dataset: str):
    with pytest.raises(FlowtuneError) as info:
        list_records(saved_dataset)
    message = str(info.value)
    assert "no image column 'image'" in message and "columns: img, label, notes" in message
    assert "data.image_column" in message and "\n" not in message


def test_dataset_missing_caption_column_names_the_columns(saved_dataset: str):
    with pytest.raises(
        FlowtuneError,
        match=r"no caption column 'prompt' \(columns: img, label, notes\).*data\.caption_column",
    ):
        list_records(saved_dataset, image_column="img", caption_column="prompt")


def test_dataset_without_caption_column_has_no_captions(saved_dataset: str):
    (record,) = list_records(saved_dataset, image_column="img").records
    assert record.caption is None and record.metadata == {"label": 3, "notes": "n"}


def test_dataset_non_text_caption_or_image_column_is_an_error(saved_dataset: str):
    with pytest.raises(FlowtuneError, match=r"caption column 'label' holds .*not text"):
        list_records(saved_dataset, image_column="img", caption_column="label")
    with pytest.raises(FlowtuneError, match=r"column 'label' holds .*not images or file paths"):
        list_records(saved_dataset, image_column="label")


def test_dataset_name_goes_to_load_dataset(monkeypatch, datasets):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"image": pil_images(2), "caption": ["x", "y"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    listing = list_records("someone/cats", dataset_split="test")
    assert calls == [("someone/cats", "test")]
    assert listing.kind == "datasets"
    assert [(r.path, r.caption) for r in listing.records] == [
        ("someone/cats[0]", "x"),
        ("someone/cats[1]", "y"),
    ]


def test_unknown_dataset_name_is_an_error(datasets):
    with pytest.raises(FlowtuneError) as info:
        list_records("flowtune-test-nobody/no-such-dataset")
    message = str(info.value)
    assert message.startswith(
        "data.source 'flowtune-test-nobody/no-such-dataset' is not a file or folder, and loading it as a "
        "Hugging Face dataset failed: "
    )
    assert "\n" not in message


def test_dataset_without_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(FlowtuneError, match=r"pip install datasets"):
        list_records("someone/cats")


# ---------------------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    ("caption", "trigger", "default", "expected"),
    [
        ("a cat", None, None, ("a cat", None)),
        ("a cat", "sks", None, ("sks, a cat", None)),
        (None, None, "a photo", ("a photo", None)),
        ("   ", "sks", "a photo", ("sks, a photo", None)),
        (None, None, None, ("", NO_CAPTION_WARNING)),
        ("", "sks", None, ("sks", NO_CAPTION_WARNING)),
        (None, "sks", "", ("sks", NO_CAPTION_WARNING)),
    ],
)
def test_apply_caption_options(caption, trigger, default, expected):
    assert apply_caption_options(caption, trigger, default) == expected


def test_no_caption_warning_text():
    assert NO_CAPTION_WARNING == "no caption; using an empty caption (set data.default_caption)"
