"""flowtune preprocess on a tiny FLUX.1 pipeline: correctness against diffusers, incrementality,
crash safety, the refusal of mismatched caches and the error report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from rich.console import Console

from flowtune.data.buckets import make_buckets, nearest_bucket
from flowtune.data.loader import BucketBatchSampler, CacheCollator, CachedDataset
from flowtune.data.preprocess import check_cache, preprocess
from flowtune.data.store import MANIFEST_NAME, CacheStore
from flowtune.data.synthetic import make_shapes_dataset
from flowtune.encoders.base import FamilyEncoder
from flowtune.errors import FlowtuneError
from flowtune.families.flux.encoder import FluxEncoder
from flowtune.recipe import load_recipe
from flowtune.tiny import make_tiny

SIZES = [(64, 64), (96, 64), (64, 112), (80, 80), (128, 64)]
PROMPTS = ["a red circle on a white background", "a blue star"]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny("flux", tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "dataset"
    make_shapes_dataset(root, 10, seed=3, sizes=SIZES)
    return root


def _recipe(tmp_path: Path, model: Path, source: Path, *overrides: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model: {{family: flux, pretrained: '{model}', dtype: float32}}\n"
        f"data: {{source: '{source}', cache_dir: '{tmp_path / 'cache'}', resolution: 64,"
        " max_sequence_length: 16, num_workers: 2, encode_batch_size: 3}\n"
        f"validation: {{prompts: {json.dumps(PROMPTS)}}}\n"
    )
    return load_recipe(path, list(overrides))


def _run(recipe, **kwargs):
    return preprocess(recipe, console=Console(quiet=True), **kwargs)


def _manifest(recipe) -> dict:
    return json.loads((Path(recipe.data.cache_dir) / MANIFEST_NAME).read_text())


class _CountingEncoder:
    """Counts what the family encoder is asked to encode (patched around FamilyEncoder)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.images = 0
        self.texts = 0
        self.loads = 0
        encoder_cls = FluxEncoder
        original_images, original_texts = encoder_cls.encode_images, encoder_cls.encode_prompts
        original_load = FamilyEncoder.load

        def encode_images(enc, images, generators=None):
            self.images += len(images)
            return original_images(enc, images, generators)

        def encode_prompts(enc, prompts):
            self.texts += len(prompts)
            return original_texts(enc, prompts)

        def load(enc, **kw):
            self.loads += 1
            return original_load(enc, **kw)

        monkeypatch.setattr(encoder_cls, "encode_images", encode_images)
        monkeypatch.setattr(encoder_cls, "encode_prompts", encode_prompts)
        monkeypatch.setattr(FamilyEncoder, "load", load)


def test_items_go_to_their_nearest_bucket_with_the_crop_recorded(tmp_path, tiny_flux, dataset) -> None:
    recipe = _recipe(tmp_path, tiny_flux, dataset)
    report = _run(recipe)
    assert report.items == 10 and report.errors == []
    buckets = make_buckets(64, 16)  # the default step at 64 px is 16
    for item in _manifest(recipe)["items"]:
        with Image.open(item["source"]) as image:
            size = image.size
        expected = nearest_bucket(*size, buckets)
        assert tuple(item["bucket"]) == (expected.width, expected.height)
        assert tuple(item["original_size"]) == size
        left, top, right, bottom = item["crop_box"]
        assert (right - left) / (bottom - top) == pytest.approx(expected.width / expected.height, rel=1e-6)
        assert item["caption"] == Path(item["source"]).with_suffix(".txt").read_text().strip()
    assert len(report.buckets) >= 3


def test_latents_equal_the_vae_encoding_of_the_cropped_image(tmp_path, tiny_flux, dataset) -> None:
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    # One image per VAE call, as the reference below does, so that the comparison can be bitwise
    # for images that need no resampling (batching changes float32 results by ~1e-5).
    recipe = _recipe(tmp_path, tiny_flux, dataset, "data.encode_batch_size=1")
    _run(recipe)
    data = CachedDataset(recipe.data.cache_dir)
    vae = AutoencoderKL.from_pretrained(tiny_flux / "vae")
    processor = VaeImageProcessor(vae_scale_factor=16)
    for index, item in enumerate(data.items):
        width, height = item["bucket"]
        with Image.open(item["source"]) as image:
            # Resize-to-cover + centre crop, done by PIL's own helper.
            cropped = ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
        with torch.no_grad():
            z = vae.encode(processor.preprocess(cropped)).latent_dist.mode()
        expected = (z - vae.config.shift_factor) * vae.config.scaling_factor
        cached = data[index]["image_latents"]
        assert cached.shape == (16, height // 8, width // 8)
        if item["original_size"] == [width, height]:
            assert torch.equal(cached, expected[0])  # no resampling at all: bitwise
        else:
            # Pillow's Lanczos with a box (ours) vs ImageOps.fit: same pixels up to rounding.
            torch.testing.assert_close(cached, expected[0], atol=2e-3, rtol=0)


def test_text_embeddings_equal_flux_encode_prompt(tmp_path, tiny_flux, dataset) -> None:
    from diffusers import FluxPipeline

    recipe = _recipe(tmp_path, tiny_flux, dataset, "data.encode_batch_size=1")
    _run(recipe)
    data = CachedDataset(recipe.data.cache_dir)
    pipe = FluxPipeline.from_pretrained(tiny_flux, transformer=None, vae=None)
    # No gradients, as at inference (gradient mode can change attention kernels).
    with torch.no_grad():
        for index in (0, 5):
            sample = data[index]
            text, pooled, _ = pipe.encode_prompt(sample["caption"], prompt_2=None, max_sequence_length=16)
            assert torch.equal(sample["text_embeddings"], text[0])
            assert torch.equal(sample["pooled_prompt_embeds"], pooled[0])
        for prompt in [*PROMPTS, ""]:
            cached = data.prompt_embeddings(prompt)
            text, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=16)
            assert torch.equal(cached["text_embeddings"], text)
            assert torch.equal(cached["pooled_prompt_embeds"], pooled)


def test_rerun_on_an_unchanged_dataset_encodes_nothing(tmp_path, tiny_flux, dataset, monkeypatch) -> None:
    recipe = _recipe(tmp_path, tiny_flux, dataset)
    first = _run(recipe)
    assert first.images_encoded == 10 and first.texts_encoded == 10 + len(PROMPTS) + 1
    before = _manifest(recipe)
    counter = _CountingEncoder(monkeypatch)
    second = _run(recipe)
    assert (counter.loads, counter.images, counter.texts) == (0, 0, 0)
    assert second.images_encoded == second.texts_encoded == 0
    assert second.images_reused == 10
    after = _manifest(recipe)
    assert after["items"] == before["items"] and after["entries"] == before["entries"]


def test_one_changed_caption_or_image_re_encodes_only_that_item(
    tmp_path, tiny_flux, dataset, monkeypatch
) -> None:
    recipe = _recipe(tmp_path, tiny_flux, dataset)
    _run(recipe)
    (dataset / "0002.txt").write_text("a different caption")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(dataset / "0004.png")
    counter = _CountingEncoder(monkeypatch)
    report = _run(recipe)
    assert (counter.images, counter.texts) == (1, 1)
    assert report.items == 10
    data = CachedDataset(recipe.data.cache_dir)
    captions = {Path(item["source"]).name: item["caption"] for item in data.items}
    assert captions["0002.png"] == "a different caption"
    live = {i["image"] for i in data.items} | {i["text"] for i in data.items}
    assert live <= set(data.store.entries)


def test_shards_no_item_uses_any_more_are_deleted(tmp_path, tiny_flux, dataset) -> None:
    recipe = _recipe(tmp_path, tiny_flux, dataset)
    _run(recipe, shard_bytes=1)  # a shard per batch: the first caption shards hold captions only
    for caption in dataset.glob("*.txt"):
        caption.write_text("re-captioned " + caption.stem)
    report = _run(recipe)
    assert report.shards_pruned >= 1  # the old captions' shards held nothing live
    store = CachedDataset(recipe.data.cache_dir).store
    manifest = _manifest(recipe)
    live = {i["image"] for i in manifest["items"]} | {i["text"] for i in manifest["items"]}
    live |= set(manifest["validation_prompts"].values()) | {manifest["empty_prompt"]}
    on_disk = {f"shards/{p.name}" for p in (Path(recipe.data.cache_dir) / "shards").glob("*.safetensors")}
    assert on_disk == {store.entries[key].shard for key in live}


def test_interrupted_run_keeps_its_work_and_resumes(tmp_path, tiny_flux, dataset, monkeypatch) -> None:
    recipe = _recipe(tmp_path, tiny_flux, dataset, "data.encode_batch_size=2")
    encoder_cls = FluxEncoder
    original = encoder_cls.encode_images
    calls = {"n": 0}

    def interrupted(enc, images, generators=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(enc, images, generators)

    monkeypatch.setattr(encoder_cls, "encode_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(recipe, shard_bytes=1)  # a shard per batch
    assert _manifest(recipe)["complete"] is False
    with pytest.raises(FlowtuneError, match="incomplete"):
        check_cache(recipe)
    monkeypatch.undo()

    counter = _CountingEncoder(monkeypatch)
    report = _run(recipe)
    assert counter.texts == 0  # all captions were saved before the interruption
    assert counter.images == 10 - 4  # two batches of two were saved
    assert report.items == 10
    check_cache(recipe)


def test_a_kill_between_shard_and_manifest_loses_nothing(tmp_path, tiny_flux, dataset, monkeypatch) -> None:
    recipe = _recipe(tmp_path, tiny_flux, dataset)
    calls = {"n": 0}
    original = CacheStore.write_manifest

    def dies_once(store, *, complete):
        calls["n"] += 1
        if calls["n"] == 1:
            raise SystemExit("killed")  # the first shard is on disk, the manifest never written
        return original(store, complete=complete)

    monkeypatch.setattr(CacheStore, "write_manifest", dies_once)
    with pytest.raises(SystemExit):
        _run(recipe, shard_bytes=1)
    assert not (Path(recipe.data.cache_dir) / MANIFEST_NAME).exists()
    monkeypatch.undo()
    counter = _CountingEncoder(monkeypatch)
    _run(recipe)
    # 13 captions (10 + 2 validation prompts + ""); the orphan shard held the first batch of 3,
    # recovered from the shard's own metadata.
    assert counter.texts == 13 - 3
    assert counter.images == 10


def test_a_kill_during_a_shard_write_leaves_no_corrupt_file(
    tmp_path, tiny_flux, dataset, monkeypatch
) -> None:
    import flowtune.data.store as store_module

    recipe = _recipe(tmp_path, tiny_flux, dataset)

    def torn_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SystemExit("killed")

    monkeypatch.setattr(store_module, "save_file", torn_write)
    with pytest.raises(SystemExit):
        _run(recipe, shard_bytes=1)
    monkeypatch.undo()
    shards = Path(recipe.data.cache_dir) / "shards"
    assert not list(shards.glob("*.safetensors"))
    report = _run(recipe)
    assert report.items == 10
    assert not [p for p in shards.iterdir() if p.suffix != ".safetensors"]  # temp files cleaned up


def test_train_refuses_a_cache_made_with_other_settings(tmp_path, tiny_flux, dataset) -> None:
    recipe = _recipe(tmp_path, tiny_flux, dataset)
    with pytest.raises(FlowtuneError, match="no preprocessed cache"):
        check_cache(recipe)
    _run(recipe)
    store = check_cache(recipe)
    assert len(store.manifest["items"]) == 10
    other = _recipe(tmp_path, tiny_flux, dataset, "data.max_sequence_length=32", "data.resolution=[64,128]")
    with pytest.raises(FlowtuneError) as info:
        check_cache(other)
    message = str(info.value)
    assert "data.max_sequence_length=16 (the recipe has 32)" in message
    assert "data.resolution=[64] (the recipe has [64, 128])" in message
    assert "flowtune preprocess" in message and "\n" not in message
    with pytest.raises(FlowtuneError, match="validation prompt 'something new'"):
        check_cache(_recipe(tmp_path, tiny_flux, dataset, "validation.prompts=[something new]"))


def test_train_refuses_a_cache_whose_model_files_changed(tmp_path, tiny_flux, dataset) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_flux, model)
    shutil.rmtree(model / "transformer")  # preprocess never needs (or loads) the transformer
    recipe = _recipe(tmp_path, model, dataset)
    _run(recipe)
    make_tiny("flux", model, seed=1, overwrite=True)
    with pytest.raises(FlowtuneError, match="changed since the cache"):
        check_cache(recipe)
    report = _run(recipe)  # the new weights give new keys: everything is re-encoded
    assert report.images_encoded == 10
    check_cache(recipe)


def test_several_resolutions_share_text_entries(tmp_path, tiny_flux, dataset) -> None:
    recipe = _recipe(tmp_path, tiny_flux, dataset, "data.resolution=[32,64]", "data.min_size=upscale")
    report = _run(recipe)
    assert report.items == 20
    items = _manifest(recipe)["items"]
    assert {i["resolution"] for i in items} == {32, 64}
    assert len({i["text"] for i in items}) == 10


def test_sampled_latents_are_seeded_per_image(tmp_path, tiny_flux, dataset) -> None:
    first = _recipe(tmp_path / "a", tiny_flux, dataset, "data.latent_dist=sample")
    second = _recipe(tmp_path / "b", tiny_flux, dataset, "data.latent_dist=sample")
    mode = _recipe(tmp_path / "c", tiny_flux, dataset)
    for recipe in (first, second, mode):
        _run(recipe)
    a, b, m = (CachedDataset(r.data.cache_dir)[0]["image_latents"] for r in (first, second, mode))
    assert torch.equal(a, b)
    assert not torch.equal(a, m)


def _write_bad_files(root: Path) -> dict[str, str]:
    """Bad inputs of every kind next to good ones; returns {file name: expected reason fragment}."""
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not a picture")
    good = root / "0000.png"
    data = good.read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (20, 20), "red").save(root / "tiny.png")
    (root / "tiny.txt").write_text("a tiny red square")
    (root / "latin1.png").write_bytes(data)
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return {
        "empty.png": "empty",
        "notes.jpg": "not an image",
        "truncated.png": "truncated",
        "tiny.png": "smaller than its",
        "latin1.png": "UTF-8",
    }


def test_bad_files_are_reported_and_the_rest_is_cached(tmp_path, tiny_flux, dataset, monkeypatch) -> None:
    expected = _write_bad_files(dataset)
    # Unusual but valid images are converted, not rejected.
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(dataset / "cmyk.jpg")
    Image.new("P", (64, 64), 3).save(dataset / "palette.png")
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.save(dataset / "transparent.png")
    Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)).save(dataset / "sixteen.png")
    (dataset / "nocaption.png").write_bytes((dataset / "0001.png").read_bytes())

    recipe = _recipe(tmp_path, tiny_flux, dataset)
    report = _run(recipe)
    assert report.items == 10 + 5
    problems = [
        json.loads(line) for line in (Path(recipe.data.cache_dir) / "errors.jsonl").read_text().splitlines()
    ]
    by_name = {Path(p["path"]).name: p for p in problems}
    for name, fragment in expected.items():
        assert fragment.lower() in by_name[name]["reason"].lower(), by_name[name]
    assert by_name["tiny.png"]["kind"] == "skipped"
    assert by_name["nocaption.png"]["kind"] == "warning"
    assert {p["kind"] for p in problems} == {"error", "skipped", "warning"}
    items = {Path(i["source"]).name: i for i in _manifest(recipe)["items"]}
    assert items["nocaption.png"]["caption"] == ""
    assert {"cmyk.jpg", "palette.png", "transparent.png", "sixteen.png"} <= set(items)

    # Failures are remembered: re-runs (not just the next one) neither re-try the images that
    # failed to decode nor lose the report.
    counter = _CountingEncoder(monkeypatch)
    for _ in range(2):
        again = _run(recipe)
        assert again.images_encoded == counter.loads == 0
        assert {Path(p.path).name for p in again.problems} == {Path(p["path"]).name for p in problems}


def test_trigger_word_and_default_caption(tmp_path, tiny_flux, dataset) -> None:
    (dataset / "0003.txt").unlink()
    recipe = _recipe(tmp_path, tiny_flux, dataset, "data.trigger_word=sks", "data.default_caption=a shape")
    report = _run(recipe)
    assert not [p for p in report.problems if "caption" in p.reason and "tokens" not in p.reason]
    captions = {Path(i["source"]).name: i["caption"] for i in _manifest(recipe)["items"]}
    assert captions["0003.png"] == "sks, a shape"
    assert captions["0000.png"] == "sks, " + (dataset / "0000.txt").read_text().strip()


def test_jsonl_and_datasets_sources_give_the_same_items(tmp_path, tiny_flux, dataset) -> None:
    import datasets

    images = sorted(dataset.glob("*.png"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"image": f"dataset/{p.name}", "caption": c, "n": i}) + "\n"
            for i, (p, c) in enumerate(zip(images, captions, strict=True))
        )
    )
    saved = tmp_path / "hf"
    table = datasets.Dataset.from_dict({"picture": [str(p) for p in images], "words": captions})
    table.cast_column("picture", datasets.Image()).save_to_disk(saved)

    folder = _recipe(tmp_path / "folder", tiny_flux, dataset)
    jsonl = _recipe(tmp_path / "jsonl", tiny_flux, manifest)
    hf = _recipe(
        tmp_path / "hf-run", tiny_flux, saved, "data.image_column=picture", "data.caption_column=words"
    )
    keys = []
    for recipe in (folder, jsonl, hf):
        assert _run(recipe).items == 10
        keys.append(sorted(i["key"] for i in _manifest(recipe)["items"]))
    assert keys[0] == keys[1] == keys[2]  # content-addressed: same bytes + caption = same item
    assert {i["metadata"]["n"] for i in _manifest(jsonl)["items"]} == set(range(10))


def test_missing_source_or_model_is_a_one_line_error(tmp_path, tiny_flux, dataset) -> None:
    with pytest.raises(FlowtuneError, match="data.source"):
        _run(_recipe(tmp_path, tiny_flux, tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FlowtuneError, match="no images"):
        _run(_recipe(tmp_path, tiny_flux, empty))
    with pytest.raises(FlowtuneError, match="model.pretrained .* does not exist"):
        _run(_recipe(tmp_path, tmp_path / "no-model", dataset))


def test_loader_reads_batches_of_one_bucket(tmp_path, tiny_flux, dataset) -> None:
    recipe = _recipe(tmp_path, tiny_flux, dataset)
    _run(recipe)
    data = CachedDataset(recipe.data.cache_dir)
    sampler = BucketBatchSampler(data.buckets, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=sampler, collate_fn=CacheCollator(data.sequence_fields), num_workers=2
    )
    seen = set()
    for batch in loader:
        assert batch["image_latents"].shape[0] == 2
        assert batch["text_embeddings"].shape == (2, 16, 32)
        assert "text_embeddings_mask" not in batch  # equal lengths: nothing padded, no mask
        assert batch["pooled_prompt_embeds"].shape == (2, 32)
        seen.update(batch["keys"])
    assert seen == {i["key"] for i in data.items}


_SLOW_PREPROCESS = """
import sys, time
from rich.console import Console
from flowtune.data.preprocess import preprocess
from flowtune.families.flux.encoder import FluxEncoder
from flowtune.recipe import load_recipe

encode = FluxEncoder.encode_images
def slow(self, images, generators=None):
    time.sleep(0.3)
    return encode(self, images, generators)
FluxEncoder.encode_images = slow
preprocess(load_recipe(sys.argv[1], sys.argv[2:]), console=Console(quiet=True), shard_bytes=1)
"""


def test_sigkill_midway_then_rerun_continues_and_matches_a_clean_run(
    tmp_path, tiny_flux, dataset, monkeypatch
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = _recipe(tmp_path, tiny_flux, dataset, "data.encode_batch_size=1")
    shards = Path(recipe.data.cache_dir) / "shards"
    repo = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PREPROCESS, str(tmp_path / "recipe.yaml"), "data.encode_batch_size=1"],
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    try:
        deadline = time.monotonic() + 120
        # Captions (13 one-caption shards) come first; wait until some images are in shards too.
        while len(list(shards.glob("*.safetensors"))) < 13 + 3:
            assert process.poll() is None, "preprocess ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    counter = _CountingEncoder(monkeypatch)
    report = _run(recipe)
    assert counter.texts == 0 and 0 < counter.images < 10
    assert report.items == 10
    resumed = CachedDataset(recipe.data.cache_dir)

    clean = _recipe(tmp_path / "clean", tiny_flux, dataset, "data.encode_batch_size=1")
    _run(clean)
    reference = CachedDataset(clean.data.cache_dir)
    assert [i["key"] for i in resumed.items] == [i["key"] for i in reference.items]
    for index in range(len(reference)):
        assert torch.equal(resumed[index]["image_latents"], reference[index]["image_latents"])


def test_captions_longer_than_the_text_encoder_limit_are_warned_about(tmp_path, tiny_flux, dataset) -> None:
    from transformers import AutoTokenizer

    (dataset / "0001.txt").write_text(" ".join(["red"] * 40))
    (dataset / "0002.txt").write_text("a cat")
    recipe = _recipe(tmp_path, tiny_flux, dataset)
    report = _run(recipe)
    tokenizer = AutoTokenizer.from_pretrained(tiny_flux / "tokenizer_2")
    expected = {
        Path(item["source"]).name
        for item in _manifest(recipe)["items"]
        if len(tokenizer(item["caption"])["input_ids"]) > 16
    }
    warned = {Path(p.path).name for p in report.problems if "tokens" in p.reason}
    assert "0001.png" in warned and "0002.png" not in warned
    assert warned == expected
    assert report.items == 10  # a warning, not an error
