"""Edit pairs for FLUX.1 Kontext: sources (folder and JSONL layouts with control images), the
synthetic edit-pair dataset, preprocess of the control latents and the loader's batches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from flowtune.data.sources import ControlImage, SourceProblem, list_records
from flowtune.data.synthetic import (
    COLOURS,
    DirectoryNotEmptyError,
    make_edit_pairs_dataset,
    sample_edit_specs,
)
from flowtune.errors import FlowtuneError


def save_image(
    path: Path, size: tuple[int, int] = (32, 24), colour: tuple[int, int, int] = (200, 30, 30)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# ---------------------------------------------------------------------------------- folder source


@pytest.fixture
def edit_folder(tmp_path: Path) -> Path:
    root = tmp_path / "pairs"
    for stem in ("a", "b", "c"):
        save_image(root / "images" / f"{stem}.png")
        write(root / "images" / f"{stem}.txt", f"make {stem} blue")
    save_image(root / "images" / "sub" / "d.png")
    save_image(root / "control" / "a.jpg")  # another extension than the target's
    save_image(root / "control" / "b.png")
    save_image(root / "control" / "c.png")
    save_image(root / "control" / "sub" / "d.webp")
    for stem in ("a", "b", "sub/d"):
        save_image(root / "control_1" / f"{stem}.png")
    write(root / "control" / "a.txt", "not an image: ignored")
    return root


def test_folder_edit_pairs_list_every_reference_in_order(edit_folder: Path) -> None:
    listing = list_records(str(edit_folder), references=True)
    assert listing.kind == "folder"
    records = {Path(r.path).relative_to(edit_folder).as_posix(): r for r in listing.records}
    assert list(records) == ["images/a.png", "images/b.png", "images/sub/d.png"]
    assert records["images/a.png"].caption == "make a blue"
    assert records["images/sub/d.png"].caption is None
    assert records["images/a.png"].controls == (
        ControlImage(str(edit_folder / "control" / "a.jpg"), edit_folder / "control" / "a.jpg"),
        ControlImage(str(edit_folder / "control_1" / "a.png"), edit_folder / "control_1" / "a.png"),
    )
    assert [
        Path(c.path).relative_to(edit_folder).as_posix() for c in records["images/sub/d.png"].controls
    ] == [
        "control/sub/d.webp",
        "control_1/sub/d.png",
    ]
    control = records["images/b.png"].controls[0]
    assert control.read_image_bytes() == (edit_folder / "control" / "b.png").read_bytes()
    stat = os.stat(edit_folder / "control" / "b.png")
    assert control.file_stat() == (stat.st_size, stat.st_mtime_ns)
    # c.png has control/c.png but no control_1/c.*: a problem of that item only.
    assert listing.problems == [
        SourceProblem(str(edit_folder / "images" / "c.png"), "no control image control_1/c.*")
    ]


def test_folder_missing_or_ambiguous_control_is_a_problem_of_the_item(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    for stem in ("ok", "none", "two", "same"):
        save_image(root / "images" / f"{stem}.png")
    save_image(root / "control" / "ok.jpg")
    save_image(root / "control" / "two.jpg")
    save_image(root / "control" / "two.webp")
    save_image(root / "control" / "same.png")  # the target's own name wins over other extensions
    save_image(root / "control" / "same.jpg")
    save_image(root / "control" / ".none.png")  # hidden: not a reference
    listing = list_records(str(root), references=True)
    assert [Path(r.path).name for r in listing.records] == ["ok.png", "same.png"]
    assert Path(listing.records[1].controls[0].path).name == "same.png"
    assert {Path(p.path).name: p.reason for p in listing.problems} == {
        "none.png": "no control image control/none.*",
        "two.png": "several control images control/two.* (two.jpg, two.webp); keep one",
    }


def test_folder_without_the_edit_pair_layout_is_a_clear_error(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    save_image(flat / "a.png")
    with pytest.raises(FlowtuneError, match=r"not an edit-pair folder: .*needs images/ .*control/"):
        list_records(str(flat), references=True)
    save_image(flat / "images" / "a.png")  # images/ but no control/
    with pytest.raises(FlowtuneError, match="not an edit-pair folder"):
        list_records(str(flat), references=True)
    save_image(flat / "control" / "a.png")
    save_image(flat / "control_2" / "a.png")
    with pytest.raises(FlowtuneError, match=r"has control_2/ but no control_1/"):
        list_records(str(flat), references=True)


def test_folder_of_plain_families_is_unchanged(edit_folder: Path) -> None:
    """Without references the layout means nothing: every image is a training image."""
    listing = list_records(str(edit_folder))
    assert len(listing.records) == 4 + 4 + 3
    assert all(r.controls == () for r in listing.records)


# ----------------------------------------------------------------------------------- jsonl source


def test_jsonl_control_is_a_path_or_a_list_of_paths(tmp_path: Path) -> None:
    save_image(tmp_path / "out" / "1.png")
    save_image(tmp_path / "out" / "2.png")
    save_image(tmp_path / "in" / "1.png")
    save_image(tmp_path / "in" / "2a.png")
    absolute = save_image(tmp_path / "elsewhere" / "2b.png")
    manifest = write(
        tmp_path / "edits.jsonl",
        json.dumps({"image": "out/1.png", "control": "in/1.png", "caption": "make it blue", "n": 1})
        + "\n"
        + json.dumps({"image": "out/2.png", "control": ["in/2a.png", str(absolute)], "caption": "swap"})
        + "\n",
    )
    listing = list_records(str(manifest), references=True)
    assert listing.problems == []
    one, two = listing.records
    assert one.caption == "make it blue" and one.metadata == {"n": 1}
    assert one.controls == (ControlImage(str(tmp_path / "in" / "1.png"), tmp_path / "in" / "1.png"),)
    assert [c.image_file for c in two.controls] == [tmp_path / "in" / "2a.png", absolute]
    assert two.controls[1].path == str(absolute)


def test_jsonl_bad_controls_are_problems_of_their_line(tmp_path: Path) -> None:
    save_image(tmp_path / "t.png")
    save_image(tmp_path / "c.png")
    lines = [
        {"image": "t.png", "control": "c.png"},
        {"image": "t.png"},
        {"image": "t.png", "control": 3},
        {"image": "t.png", "control": []},
        {"image": "t.png", "control": ["c.png", ""]},
        {"image": "t.png", "control": "missing.png"},
        {"image": "t.png", "control": ["c.png", "."]},
    ]
    manifest = write(tmp_path / "m.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    listing = list_records(str(manifest), references=True)
    assert len(listing.records) == 1
    source = str(manifest)
    assert [(p.path, p.reason) for p in listing.problems] == [
        (
            f"{source}:2",
            "no 'control' key with the control image path(s) (set data.control_column to the key used)",
        ),
        (f"{source}:3", "'control' must be a file path or a non-empty list of file paths, got a number"),
        (
            f"{source}:4",
            "'control' must be a file path or a non-empty list of file paths, got an empty array",
        ),
        (
            f"{source}:5",
            "'control' must be a file path or a non-empty list of file paths, got an array holding an empty string",
        ),
        (str(tmp_path / "t.png"), f"control image {tmp_path / 'missing.png'}: file not found"),
        (str(tmp_path / "t.png"), f"control image {tmp_path / '.'}: not a file"),
    ]


def test_jsonl_control_column_is_configurable_and_ignored_without_references(tmp_path: Path) -> None:
    save_image(tmp_path / "t.png")
    save_image(tmp_path / "c.png")
    manifest = write(tmp_path / "m.jsonl", json.dumps({"image": "t.png", "source": "c.png"}) + "\n")
    (record,) = list_records(str(manifest), references=True, control_column="source").records
    assert [c.image_file for c in record.controls] == [tmp_path / "c.png"]
    assert record.metadata == {}
    (plain,) = list_records(str(manifest)).records
    assert plain.controls == () and plain.metadata == {"source": "c.png"}


def test_datasets_are_not_supported_for_edit_pairs(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    write(saved / "dataset_dict.json", "{}")
    with pytest.raises(FlowtuneError, match="not supported for edit pairs"):
        list_records(str(saved), references=True)
    with pytest.raises(FlowtuneError, match="not supported for edit pairs"):
        list_records("someone/edits", references=True)


# ------------------------------------------------------------------------------ synthetic pairs


def test_synthetic_edit_pairs_recolour_the_control_shape(tmp_path: Path) -> None:
    root = tmp_path / "edits"
    paths = make_edit_pairs_dataset(
        root, 4, seed=2, sizes=[(64, 64), (96, 64)], control_sizes=[(48, 48), (64, 96)]
    )
    assert [p.relative_to(root).as_posix() for p in paths] == [f"images/{i:04d}.png" for i in range(4)]
    for index, (path, edit) in enumerate(zip(paths, sample_edit_specs(4, seed=2), strict=True)):
        assert edit.new_colour not in (edit.source.colour, edit.source.background)
        assert path.with_suffix(".txt").read_text() == f"make the {edit.source.shape} {edit.new_colour}\n"
        with Image.open(path) as target, Image.open(root / "control" / path.name) as control:
            assert target.size == [(64, 64), (96, 64)][index % 2]
            assert control.size == [(48, 48), (64, 96)][index % 2]
            # The centre pixel is the shape's (every shape covers the centre except the ring).
            if edit.source.shape != "ring":
                centre = (target.width // 2, target.height // 2)
                assert target.getpixel(centre) == COLOURS[edit.new_colour]
                assert (
                    control.getpixel((control.width // 2, control.height // 2)) == COLOURS[edit.source.colour]
                )
            assert target.getpixel((0, 0)) == control.getpixel((0, 0)) == COLOURS[edit.source.background]
    listing = list_records(str(root), references=True)
    assert len(listing.records) == 4 and listing.problems == []
    again = tmp_path / "again"
    make_edit_pairs_dataset(again, 4, seed=2, sizes=[(64, 64), (96, 64)], control_sizes=[(48, 48), (64, 96)])
    for path in paths:
        for folder in ("images", "control"):
            assert (again / folder / path.name).read_bytes() == (root / folder / path.name).read_bytes()


def test_synthetic_edit_pairs_refuse_a_non_empty_folder_unless_overwriting(tmp_path: Path) -> None:
    root = tmp_path / "edits"
    make_edit_pairs_dataset(root, 3)
    with pytest.raises(DirectoryNotEmptyError):
        make_edit_pairs_dataset(root, 2)
    make_edit_pairs_dataset(root, 2, overwrite=True)
    assert sorted(p.name for p in (root / "images").iterdir()) == [
        "0000.png",
        "0000.txt",
        "0001.png",
        "0001.txt",
    ]
    assert sorted(p.name for p in (root / "control").iterdir()) == ["0000.png", "0001.png"]
    with pytest.raises(ValueError, match="control_sizes is empty"):
        make_edit_pairs_dataset(tmp_path / "bad", 2, control_sizes=[])
