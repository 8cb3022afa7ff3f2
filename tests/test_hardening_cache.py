"""Hardening of the preprocess cache and the loader (issue 16): damaged or missing shards are
refused by training in one line and repaired by preprocess, ``preprocess --verify`` reads every
tensor and re-hashes every source file, a read error while training is one line, and a batch
larger than every bucket is warned about."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console

import flowtune.data.store as store_module
from flowtune.data.loader import CachedDataset
from flowtune.data.preprocess import check_cache, preprocess
from flowtune.data.store import MANIFEST_NAME, SHARDS_DIR, CacheStore
from flowtune.data.synthetic import make_shapes_dataset
from flowtune.errors import FlowtuneError
from flowtune.recipe import load_recipe
from flowtune.tiny import make_tiny
from flowtune.train.trainer import Trainer
from tests.helpers import assert_user_error, cli

BMP = "0006.bmp"  # an uncompressed image: rewritten pixels keep the file size


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1 model, 7 images in two buckets (one a BMP) with old mtimes, a recipe file,
    and their cache written a shard per encoder batch (several image and caption shards)."""
    root = tmp_path_factory.mktemp("hardening")
    model = make_tiny("flux", root / "tiny-flux")
    data = root / "dataset"
    make_shapes_dataset(data, 6, seed=2, sizes=[(64, 64), (96, 64)])
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / BMP)
    (data / BMP).with_suffix(".txt").write_text("a red square")
    old = time.time() - 3600  # older than the racy window: hashes are remembered by size and mtime
    for path in data.iterdir():
        os.utime(path, (old, old))
    (root / "recipe.yaml").write_text(
        f"model: {{family: flux, pretrained: '{model}', dtype: float32}}\n"
        "lora: {rank: 4, alpha: 4}\n"
        f"data: {{source: '{data}', cache_dir: '{root / 'cache'}', resolution: 64,"
        " max_sequence_length: 16, encode_batch_size: 2}\n"
        "train: {max_steps: 1, seed: 0, mixed_precision: 'no', checkpoint_every: 1}\n"
    )
    preprocess(load_recipe(root / "recipe.yaml"), console=Console(quiet=True), shard_bytes=1)
    return root


def _copy(env: Path, tmp_path: Path, *, dataset: bool = False, **overrides: str):
    """The recipe on a copy of the cache (and of the dataset, with its mtimes)."""
    shutil.copytree(env / "cache", tmp_path / "cache")
    args = [f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'run'}"]
    if dataset:
        shutil.copytree(env / "dataset", tmp_path / "dataset")
        args.append(f"data.source={tmp_path / 'dataset'}")
    return load_recipe(env / "recipe.yaml", args + [f"{k}={v}" for k, v in overrides.items()])


def _shards(recipe, kind: str) -> list[Path]:
    """The shards holding entries of ``kind`` ("image" | "text"), in name order."""
    manifest = json.loads((Path(recipe.data.cache_dir) / MANIFEST_NAME).read_text())
    names = {ref["shard"] for ref in manifest["entries"].values() if ref["kind"] == kind}
    return [Path(recipe.data.cache_dir) / name for name in sorted(names)]


def _entries_of(recipe, shard: Path) -> set[str]:
    manifest = json.loads((Path(recipe.data.cache_dir) / MANIFEST_NAME).read_text())
    return {key for key, ref in manifest["entries"].items() if ref["shard"] == f"{SHARDS_DIR}/{shard.name}"}


def _damage(shard: Path, how: str) -> None:
    """Truncate the shard, overwrite its JSON header, or delete it."""
    data = shard.read_bytes()
    if how == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif how == "header":
        shard.write_bytes(data[:8] + b"#" * 16 + data[24:])
    else:
        shard.unlink()


def _encoded_keys(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys of the entries preprocess encodes from now on."""
    added: list[str] = []
    original = CacheStore.add

    def add(store, key, kind, tensors):
        added.append(key)
        return original(store, key, kind, tensors)

    monkeypatch.setattr(CacheStore, "add", add)
    return added


def _run(recipe, **kwargs):
    return preprocess(recipe, console=Console(quiet=True), **kwargs)


def _read_all(recipe) -> dict[str, dict[str, torch.Tensor]]:
    """Every item's tensors, copied out of the memory-mapped shards."""
    data = CachedDataset(recipe.data.cache_dir)
    return {
        item["key"]: {k: v.clone() for k, v in data[i].items() if isinstance(v, torch.Tensor)}
        for i, item in enumerate(data.items)
    }


@pytest.mark.parametrize("how", ["truncate", "header", "delete"])
def test_train_refuses_a_damaged_or_missing_shard_naming_it(env, tmp_path, how) -> None:
    recipe = _copy(env, tmp_path)
    shard = _shards(recipe, "image")[0]
    _damage(shard, how)
    with pytest.raises(FlowtuneError) as info:
        check_cache(recipe)
    message = str(info.value)
    assert shard.name in message and "flowtune preprocess" in message and "\n" not in message


def test_preprocess_re_encodes_what_damaged_or_missing_shards_held(env, tmp_path, monkeypatch) -> None:
    recipe = _copy(env, tmp_path)
    before = _read_all(recipe)
    truncated, deleted = _shards(recipe, "image")[:2]
    corrupt = _shards(recipe, "text")[0]
    lost = _entries_of(recipe, truncated) | _entries_of(recipe, deleted) | _entries_of(recipe, corrupt)
    kept = sorted(p.name for p in (Path(recipe.data.cache_dir) / SHARDS_DIR).iterdir())
    kept = [name for name in kept if name not in (truncated.name, deleted.name, corrupt.name)]
    _damage(truncated, "truncate")
    _damage(deleted, "delete")
    _damage(corrupt, "header")

    encoded = _encoded_keys(monkeypatch)
    report = _run(recipe)
    assert sorted(encoded) == sorted(lost)  # exactly what they held; the rest of the cache stays
    assert report.items == len(before)
    warned = " ".join(p.path + p.reason for p in report.problems if p.kind == "warning")
    for shard in (truncated, deleted, corrupt):
        assert shard.name in warned
        assert not shard.exists()
    on_disk = {p.name for p in (Path(recipe.data.cache_dir) / SHARDS_DIR).iterdir()}
    assert set(kept) <= on_disk
    check_cache(recipe)
    after = _read_all(recipe)
    for key, item in before.items():
        for name, value in item.items():
            torch.testing.assert_close(after[key][name], value)
    # The repaired cache is whole: a second run encodes nothing.
    encoded.clear()
    assert _run(recipe).images_encoded == 0 and encoded == []


def test_verify_reads_every_tensor_and_re_encodes_a_shard_that_fails(env, tmp_path, monkeypatch) -> None:
    recipe = _copy(env, tmp_path)
    shard = _shards(recipe, "image")[-1]
    held = _entries_of(recipe, shard)
    original = store_module.load_shard
    read: list[str] = []

    def failing(path: Path) -> dict[str, torch.Tensor]:
        read.append(path.name)
        if path.name == shard.name:
            raise OSError(5, "Input/output error")
        return original(path)

    monkeypatch.setattr(store_module, "load_shard", failing)
    encoded = _encoded_keys(monkeypatch)
    _run(recipe)
    assert read == [] and encoded == []  # the cheap check reads no tensor data
    report = _run(recipe, verify=True)
    assert sorted(encoded) == sorted(held)
    assert shard.name in " ".join(p.path + p.reason for p in report.problems)
    assert len(read) >= len(_shards(recipe, "image")) + len(_shards(recipe, "text")) - 1


def test_verify_re_hashes_an_image_replaced_with_the_same_size_and_mtime(env, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from flowtune.cli import app

    recipe = _copy(env, tmp_path, dataset=True)
    _run(recipe)  # remembers the copied files' hashes by size and mtime
    image = tmp_path / "dataset" / BMP
    stat = image.stat()
    Image.new("RGB", (64, 64), (30, 30, 200)).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size
    assert _run(recipe).images_encoded == 0  # the documented fast path: size and mtime agree

    encoded = _encoded_keys(monkeypatch)
    args = [f"data.cache_dir={recipe.data.cache_dir}", f"data.source={recipe.data.source}", "--verify"]
    result = CliRunner().invoke(app, ["preprocess", str(env / "recipe.yaml"), *args])
    assert result.exit_code == 0, result.output
    items = json.loads((tmp_path / "cache" / MANIFEST_NAME).read_text())["items"]
    replaced = [item for item in items if item["source"].endswith(BMP)]
    assert [item["image_sha256"] for item in replaced] == [hashlib.sha256(image.read_bytes()).hexdigest()]
    assert encoded == [replaced[0]["image"]]  # the replaced image only


def test_a_shard_that_fails_while_training_is_one_line(env, tmp_path) -> None:
    from torch.utils.data import DataLoader

    recipe = _copy(env, tmp_path)
    check_cache(recipe)
    data = CachedDataset(recipe.data.cache_dir)
    shard = Path(recipe.data.cache_dir) / data.store.entries[data.items[0]["image"]].shard
    shard.write_bytes(shard.read_bytes()[:100])  # after the check, before any read
    with pytest.raises(FlowtuneError) as info:
        data[0]
    assert shard.name in str(info.value) and "flowtune preprocess" in str(info.value)
    # In a data-loader worker: torch re-raises it with the worker's traceback in the message.
    loader = DataLoader(CachedDataset(recipe.data.cache_dir), batch_size=None, num_workers=1)
    with pytest.raises(FlowtuneError) as info:
        list(loader)
    message = str(info.value)
    assert shard.name in message and "flowtune preprocess" in message and "\n" not in message


def test_train_cli_refuses_a_truncated_shard_in_one_line(env, tmp_path) -> None:
    recipe = _copy(env, tmp_path)
    shard = _shards(recipe, "text")[-1]
    _damage(shard, "truncate")
    result = cli(
        "train",
        str(env / "recipe.yaml"),
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path}/run",
    )
    assert_user_error(result, shard.name, "flowtune preprocess")


def test_a_batch_larger_than_every_bucket_is_warned_about(env, tmp_path) -> None:
    recipe = _copy(env, tmp_path, **{"train.batch_size": "8"})
    console = Console(record=True, width=300)
    Trainer(recipe, console=console).run()
    text = console.export_text()
    assert "train.batch_size=8 but the largest bucket has 4 items" in text
    assert "64x64: 4" in text and "every batch repeats items" in text

    from flowtune.data.loader import repeated_items_warning

    groups = [(64, 64)] * 4 + [(96, 64)] * 3
    assert repeated_items_warning(groups, 4) is None  # fits the largest bucket
    two = repeated_items_warning(groups, 3, num_replicas=2)
    assert two is not None and "global batch of 6" in two and "train.batch_size" in two
