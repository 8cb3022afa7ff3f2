"""Edit pairs for FLUX.1 Kontext: sources (folder and JSONL layouts with control images), the
synthetic edit-pair dataset, preprocess of the control latents and the loader's batches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console

from flowtune.data.loader import BucketBatchSampler, CacheCollator, CachedDataset
from flowtune.data.preprocess import check_cache, preprocess
from flowtune.data.sources import ControlImage, SourceProblem, list_records
from flowtune.data.store import MANIFEST_NAME
from flowtune.data.synthetic import (
    COLOURS,
    DirectoryNotEmptyError,
    make_edit_pairs_dataset,
    sample_edit_specs,
)
from flowtune.encoders import EncoderSettings, create_encoder
from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.recipe import load_recipe
from flowtune.tiny import make_tiny
from tests.helpers import save_image, write

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


# ------------------------------------------------------------------------------------- preprocess

# (target size, control size): controls of other sizes than their targets, two of one size.
PAIRS = [((64, 64), (48, 48)), ((96, 64), (64, 96)), ((64, 64), (48, 48)), ((64, 112), (80, 64))]


@pytest.fixture(scope="module")
def tiny_kontext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny("flux-kontext", tmp_path_factory.mktemp("models") / "tiny-kontext")


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    root = tmp_path / "pairs"
    make_edit_pairs_dataset(
        root, len(PAIRS), seed=5, sizes=[t for t, _ in PAIRS], control_sizes=[c for _, c in PAIRS]
    )
    return root


def _recipe(tmp_path: Path, model: Path, source: Path, *overrides: str, family: str = "flux-kontext"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model: {{family: {family}, pretrained: '{model}', dtype: float32}}\n"
        f"data: {{source: '{source}', cache_dir: '{tmp_path / 'cache'}', resolution: 64,"
        " max_sequence_length: 16, encode_batch_size: 2, min_size: upscale}\n"
        "validation: {prompts: []}\n"
    )
    return load_recipe(path, list(overrides))


def _run(recipe, **kwargs):
    return preprocess(recipe, console=Console(quiet=True), **kwargs)


def _manifest(recipe) -> dict:
    return json.loads((Path(recipe.data.cache_dir) / MANIFEST_NAME).read_text())


class _Counter:
    """Counts the images the family encoder encodes and how often it loads models."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.images = 0
        self.loads = 0
        encoder_cls = get_family("flux-kontext").load_encoder_class()
        encode, load = encoder_cls.encode_images, encoder_cls.load

        def counting_encode(enc, images, generators=None):
            self.images += len(images)
            return encode(enc, images, generators)

        def counting_load(enc, **kw):
            self.loads += 1
            return load(enc, **kw)

        monkeypatch.setattr(encoder_cls, "encode_images", counting_encode)
        monkeypatch.setattr(encoder_cls, "load", counting_load)


def _pipeline_control_latents(pipe, image: Image.Image, auto_resize: bool, size=None) -> torch.Tensor:
    """A control image's latents as FluxKontextPipeline.__call__ computes them (its step 3,
    "Preprocess image", then _encode_vae_image), for a reference given as ``image``; with
    ``size`` = (w, h) the image is first resized to it as sampling does for ``match_target``."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    if size is not None:
        image = pipe.image_processor.resize(image, size[1], size[0])
    multiple_of = pipe.vae_scale_factor * 2
    image_height, image_width = pipe.image_processor.get_default_height_width(image)
    aspect_ratio = image_width / image_height
    if auto_resize:
        _, image_width, image_height = min(
            (abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS
        )
    image_width = image_width // multiple_of * multiple_of
    image_height = image_height // multiple_of * multiple_of
    image = pipe.image_processor.resize(image, image_height, image_width)
    image = pipe.image_processor.preprocess(image, image_height, image_width)
    with torch.no_grad():
        return pipe._encode_vae_image(image, generator=None)[0]


# `kontext` encodes at the pipeline's ~1 MP sizes (9 s) and is in `make test-extended`; the sizes
# themselves are test_control_size_of_sides_that_are_not_multiples_of_16_follows_the_pipeline's,
# the bitwise encoding is also match_target's.
@pytest.mark.parametrize("mode", [pytest.param("kontext", marks=pytest.mark.extended), "match_target"])
def test_control_latents_equal_flux_kontext_pipeline_preprocessing(
    tmp_path, tiny_kontext, pairs, mode
) -> None:

    # The same control image in two pairs is one control entry.
    (pairs / "control" / "0002.png").write_bytes((pairs / "control" / "0000.png").read_bytes())
    # One image per VAE call, as the pipeline encodes one reference, so the comparison is bitwise.
    recipe = _recipe(tmp_path, tiny_kontext, pairs, f"data.control_resize={mode}", "data.encode_batch_size=1")
    report = _run(recipe)
    assert report.items == len(PAIRS) and report.errors == []
    assert (report.controls_encoded, report.controls_reused) == (len(PAIRS) - 1, 0)
    data = CachedDataset(recipe.data.cache_dir)
    pipe = _vae_pipeline(tiny_kontext)
    for index, item in enumerate(data.items):
        (control,) = item["controls"]
        with Image.open(control["source"]) as image:
            rgb = image.convert("RGB")
        assert control["original_size"] == list(rgb.size)
        sample = data[index]
        if mode == "kontext":
            expected = _pipeline_control_latents(pipe, rgb, auto_resize=True)
        else:
            # match_target: the target's bucket size; the pipeline then keeps that size.
            expected = _pipeline_control_latents(pipe, rgb, auto_resize=False, size=tuple(item["bucket"]))
            assert control["size"] == item["bucket"]
        width, height = control["size"]
        assert sample["control_latents_0"].shape == expected.shape == (16, height // 8, width // 8)
        assert torch.equal(sample["control_latents_0"], expected)
        assert sample["image_latents"].shape == (16, item["bucket"][1] // 8, item["bucket"][0] // 8)
    if mode == "kontext":
        assert {tuple(i["controls"][0]["size"]) for i in data.items} == {
            (1024, 1024),
            (832, 1248),
            (1104, 944),
        }


def test_control_size_of_sides_that_are_not_multiples_of_16_follows_the_pipeline(tiny_kontext) -> None:
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    spec = get_family("flux-kontext")
    encoder = create_encoder(spec, tiny_kontext, EncoderSettings("float32", 16, "mode"))
    pipe = _vae_pipeline(tiny_kontext)
    for width, height in [(100, 72), (1000, 750), (640, 480), (1920, 1080)]:
        h, w = pipe.image_processor.get_default_height_width(Image.new("RGB", (width, height)))
        _, pw, ph = min((abs(w / h - a / b), a, b) for a, b in PREFERRED_KONTEXT_RESOLUTIONS)
        assert encoder.control_size(width, height) == (pw // 16 * 16, ph // 16 * 16), (width, height)


def test_rerun_encodes_nothing_and_one_changed_control_re_encodes_only_it(
    tmp_path, tiny_kontext, pairs, monkeypatch
) -> None:
    recipe = _recipe(tmp_path, tiny_kontext, pairs, "data.control_resize=match_target")
    first = _run(recipe, shard_bytes=1)  # a shard per batch, so that dead entries can be pruned
    before = _manifest(recipe)
    counter = _Counter(monkeypatch)
    again = _run(recipe)
    assert (counter.loads, counter.images) == (0, 0)
    assert (again.controls_encoded, again.controls_reused) == (0, first.controls_encoded)
    assert _manifest(recipe)["items"] == before["items"]

    Image.new("RGB", (64, 96), (10, 200, 30)).save(pairs / "control" / "0001.png")
    changed = _run(recipe)
    assert counter.images == 1  # that control image only: no target, no other control
    assert (changed.images_encoded, changed.texts_encoded, changed.controls_encoded) == (0, 0, 1)
    items = _manifest(recipe)["items"]
    assert [i["key"] != j["key"] for i, j in zip(before["items"], items, strict=True)] == [
        False,
        True,
        False,
        False,
    ]
    assert items[1]["image"] == before["items"][1]["image"]
    # The old control entry is no longer live: its shard is gone; every live entry is on disk.
    store = CachedDataset(recipe.data.cache_dir).store
    live = (
        {i["image"] for i in items}
        | {i["text"] for i in items}
        | {c["key"] for i in items for c in i["controls"]}
    )
    assert before["items"][1]["controls"][0]["key"] not in store.entries
    assert live <= set(store.entries)
    assert changed.shards_pruned >= 1


def test_changing_control_resize_is_noticed_and_re_encodes_only_controls(
    tmp_path, tiny_kontext, pairs
) -> None:
    recipe = _recipe(tmp_path, tiny_kontext, pairs, "data.control_resize=match_target")
    _run(recipe)
    check_cache(recipe)
    other = _recipe(tmp_path, tiny_kontext, pairs, "data.control_resize=kontext")
    with pytest.raises(
        FlowtuneError, match=r'data\.control_resize="match_target" \(the recipe has "kontext"\)'
    ):
        check_cache(other)
    report = _run(other)
    assert (report.images_encoded, report.texts_encoded) == (0, 0)
    assert (report.controls_encoded, report.controls_reused) == (len(PAIRS), 0)
    check_cache(other)


def test_unreadable_or_missing_control_images_are_reported_per_item(
    tmp_path, tiny_kontext, pairs, monkeypatch
) -> None:
    control = pairs / "control"
    data = (control / "0001.png").read_bytes()
    (control / "0001.png").write_bytes(data[: len(data) // 2])  # truncated: found only when decoded
    (control / "0002.png").write_text("not a picture")  # found when the header is read
    (control / "0003.png").unlink()
    recipe = _recipe(tmp_path, tiny_kontext, pairs, "data.control_resize=match_target")
    report = _run(recipe)
    assert report.items == 1
    problems = {
        Path(p["path"]).name: p
        for p in map(json.loads, (Path(recipe.data.cache_dir) / "errors.jsonl").read_text().splitlines())
    }
    assert set(problems) == {"0001.png", "0002.png", "0003.png"}
    assert problems["0001.png"]["reason"].startswith(f"control image {control / '0001.png'}: truncated")
    assert (
        problems["0002.png"]["reason"]
        == f"control image {control / '0002.png'}: not an image file (cannot identify image format)"
    )
    assert problems["0003.png"]["reason"] == "no control image control/0003.*"
    assert {p["kind"] for p in problems.values()} == {"error"}
    assert [Path(i["source"]).name for i in _manifest(recipe)["items"]] == ["0000.png"]

    # Failures are remembered: later runs load no model and report the same problems.
    counter = _Counter(monkeypatch)
    for _ in range(2):
        again = _run(recipe)
        assert counter.loads == 0 and again.items == 1
        assert sorted((p.path, p.reason) for p in again.problems) == sorted(
            (p["path"], p["reason"]) for p in problems.values()
        )
    (control / "0001.png").write_bytes(data)  # fixed: encoded on the next run
    assert _run(recipe).items == 2


def test_batches_never_mix_control_sizes_or_counts(tmp_path, tiny_kontext) -> None:
    root = tmp_path / "data"
    lines = []
    # Targets of one bucket; controls of two sizes, and one item with two references.
    for index, control_sizes in enumerate(
        [[(64, 64)], [(32, 32)], [(64, 64)], [(32, 32)], [(64, 64), (32, 32)]]
    ):
        target = save_image(root / f"t{index}.png", (64, 64), (10 * index, 0, 0))
        controls = [
            save_image(root / f"c{index}_{k}.png", size, (0, 10 * index, k)).name
            for k, size in enumerate(control_sizes)
        ]
        lines.append(
            {
                "image": target.name,
                "control": controls if len(controls) > 1 else controls[0],
                "caption": f"edit {index}",
            }
        )
    manifest = write(root / "edits.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    recipe = _recipe(tmp_path, tiny_kontext, manifest, "data.control_resize=kontext")
    # Keep kontext's ~1 megapixel controls cheap: the control size is what batching is about.
    encoder_cls = get_family("flux-kontext").load_encoder_class()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(encoder_cls, "control_size", lambda self, w, h: (w, h))
        assert _run(recipe).items == 5
    data = CachedDataset(recipe.data.cache_dir)
    assert set(data.buckets) == {(64, 64)}
    assert len(set(data.batch_groups)) == 3
    sampler = BucketBatchSampler(data.batch_groups, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=sampler, collate_fn=CacheCollator(data.sequence_fields)
    )
    seen = set()
    for batch in loader:
        controls = sorted(k for k in batch if k.startswith("control_latents_"))
        assert batch["image_latents"].shape == (2, 16, 8, 8)
        assert batch["control_latents_0"].shape[0] == 2
        if len(controls) == 2:
            assert batch["control_latents_0"].shape[2:] == (8, 8) and batch["control_latents_1"].shape[
                2:
            ] == (4, 4)
        seen.update(batch["keys"])
    assert seen == {i["key"] for i in data.items}


def test_plain_families_cache_no_controls(tmp_path) -> None:
    source = tmp_path / "flat"
    make_edit_pairs_dataset(source, 2)
    # A FLUX.1 model: a Kontext folder is refused for family flux (its model_index.json names
    # FluxKontextPipeline).
    model = make_tiny("flux", tmp_path / "tiny-flux")
    recipe = _recipe(tmp_path, model, source, family="flux")
    report = _run(recipe)
    assert report.items == 4  # images/ and control/ are just folders of images for FLUX.1
    assert report.controls_encoded == report.controls_reused == 0
    manifest = _manifest(recipe)
    assert all("controls" not in item for item in manifest["items"])
    assert "data.control_resize" not in manifest["settings"]
    data = CachedDataset(recipe.data.cache_dir)
    assert data.batch_groups == data.buckets
    assert not [k for k in data[0] if k.startswith("control")]


def _vae_pipeline(model: Path):
    """The tiny FluxKontextPipeline with only its VAE and image processor (no transformer or text
    encoders): what its reference-image preprocessing needs."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline.from_pretrained(
        model, transformer=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None
    )


# ------------------------------------------------------- prompt embeddings that use the references


class _ReferencePrompts:
    """Makes FLUX.1 Kontext's encoder one whose prompt embeddings depend on the references
    (``FamilyEncoder.text_uses_references``, as Qwen-Image-Edit's): each caption's embeddings are
    its own plus the mean of its references' pixels, and the references it was given are recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[tuple[str, list[tuple[int, int]]]] = []
        encoder_cls = get_family("flux-kontext").load_encoder_class()
        encode = encoder_cls.encode_prompts

        def encode_with_references(enc, prompts, references):
            out = encode(enc, prompts)
            for i, (prompt, images) in enumerate(zip(prompts, references, strict=True)):
                self.calls.append((prompt, [image.size for image in images]))
                shift = sum(
                    float(torch.tensor(list(image.getdata()), dtype=torch.float32).mean()) for image in images
                )
                out["text_embeddings"][i] += shift
            return out

        monkeypatch.setattr(encoder_cls, "text_uses_references", True)
        monkeypatch.setattr(encoder_cls, "encode_prompts", encode_with_references)


def test_text_entries_of_an_encoder_whose_prompts_use_the_references(
    tmp_path, tiny_kontext, pairs, monkeypatch
) -> None:
    """Each caption is keyed and encoded with its item's references (as the pipeline is handed
    them: under match_target, brought to the target's bucket; the files as they are otherwise,
    which tests/test_qwen_image_edit.py checks with Qwen-Image-Edit's ``pipeline`` mode, as
    Kontext's 1 MP ``kontext`` mode costs seconds here); changing a reference re-encodes its
    caption; no validation prompt is cached (validation encodes them)."""
    mode = "match_target"
    fake = _ReferencePrompts(monkeypatch)
    recipe = _recipe(
        tmp_path,
        tiny_kontext,
        pairs,
        f"data.control_resize={mode}",
        "validation.prompts=['x']",
        f"validation.images=['{pairs / 'control' / '0000.png'}']",
    )
    report = _run(recipe)
    manifest = _manifest(recipe)
    assert report.texts_encoded == len(PAIRS) and len(fake.calls) == len(PAIRS)
    by_caption = {item["caption"]: item for item in manifest["items"]}
    for caption, sizes in fake.calls:
        item = by_caption[caption]
        expected = [
            tuple(c["size"]) if mode == "match_target" else tuple(c["original_size"])
            for c in item["controls"]
        ]
        assert sizes == expected
    assert manifest["validation_prompts"] == {} and manifest["empty_prompt"] is None
    check_cache(recipe)

    Image.new("RGB", (64, 96), (10, 200, 30)).save(pairs / "control" / "0001.png")
    changed = _run(recipe)
    assert (changed.texts_encoded, changed.controls_encoded) == (1, 1)
    assert fake.calls[-1][0] == manifest["items"][1]["caption"]
    assert _manifest(recipe)["items"][1]["text"] != manifest["items"][1]["text"]
    dataset = CachedDataset(recipe.data.cache_dir)
    assert all(torch.isfinite(dataset[i]["text_embeddings"]).all() for i in range(len(dataset)))
