"""Benchmark the data path: `flowtune preprocess` throughput, and the cached loader against raw reads.

Measures, on the CPU of whatever machine runs it:
  * preprocessing: a cold `preprocess` (everything encoded) of a generated shapes dataset with the
    tiny FLUX.1 pipeline, in items/s, split into time inside the model (load + forward passes) and
    the rest; then the wall time of a no-op re-run (nothing to encode), in this process and as a
    new `flowtune preprocess` process;
  * loading: batches/s of `CachedDataset` + `BucketBatchSampler` + `CacheCollator` through a
    `torch.utils.data.DataLoader` (num_workers 0 and 2) against the floor, a plain loop of
    `safetensors.safe_open(...).get_tensor` and `torch.stack` of the same tensors, on a cache
    written synthetically with real FLUX.1 [dev] entry sizes at 1024 px (no model needed), and on
    one with the tiny demo's sizes; and collation alone, `CacheCollator` against `torch.stack`.
    The shards are read once first, so the page cache is warm.

The machine may be shared, so every figure is the best of several runs.

Usage: python scripts/bench_data.py [--images 200] [--cold-runs 3] [--cache-items 128] [--rounds 25]
       [--write docs/performance.md]

With --write, only the section starting at `## Data path` (up to the next `## ` heading) is
replaced; it is appended if absent.  The other sections belong to scripts/bench_core.py.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from perfdoc import write_section  # scripts/perfdoc.py (this directory is on sys.path)
from rich.console import Console
from safetensors import safe_open
from torch.utils.data import DataLoader

import flowtune.data.preprocess as preprocess_module
from flowtune.data.loader import BucketBatchSampler, CacheCollator, CachedDataset
from flowtune.data.preprocess import SHARD_BYTES, preprocess
from flowtune.data.store import CacheStore
from flowtune.data.synthetic import make_shapes_dataset
from flowtune.families import get_family
from flowtune.families.flux.encoder import FluxEncoder
from flowtune.quiet import quiet_libraries
from flowtune.recipe import load_recipe
from flowtune.tiny import make_tiny

SECTION = "## Data path"
RESOLUTION = 256
IMAGE_SIZES = ((256, 256), (320, 256), (256, 320), (384, 256), (256, 384))
BATCH_SIZE = 4
WORKERS = (0, 2)
# {kind: {field: is_sequence}} as preprocess records them for FLUX.1.
FIELDS = {"image": FluxEncoder.image_fields, "text": FluxEncoder.text_fields}


@dataclass(frozen=True)
class EntrySizes:
    """Shapes and dtype of one item's tensors, and the bucket they belong to."""

    name: str
    latents: tuple[int, ...]
    text: tuple[int, ...]
    pooled: tuple[int, ...]
    dtype: torch.dtype
    bucket: tuple[int, int]

    @property
    def item_bytes(self) -> int:
        numel = sum(torch.Size(s).numel() for s in (self.latents, self.text, self.pooled))
        return numel * self.dtype.itemsize


# FLUX.1 [dev] at 1024x1024: 16-channel latents / 8, T5-XXL 512 x 4096, CLIP-L pooled 768, bf16.
REAL = EntrySizes("FLUX.1 1024 px", (16, 128, 128), (512, 4096), (768,), torch.bfloat16, (1024, 1024))
# recipes/tiny-flux-demo.yaml: 64 px, the tiny T5's width 32 at max_sequence_length 32, float32.
TINY = EntrySizes("tiny demo 64 px", (16, 8, 8), (32, 32), (32,), torch.float32, (64, 64))


@dataclass
class LoadResult:
    """Batches/s per loading method (``raw``, ``workers=N``) on a cache of ``items`` items, and
    seconds per batch of collation alone (``CacheCollator``, ``torch.stack``)."""

    sizes: EntrySizes
    items: int
    rates: dict[str, float]
    collate_seconds: dict[str, float]

    def ratio(self, method: str) -> float:
        """How many times slower than the raw floor ``method`` is."""
        return self.rates["raw"] / self.rates[method]


@dataclass
class PreprocessResult:
    """What the preprocessing benchmark measured."""

    items: int
    images_encoded: int
    texts_encoded: int
    cold_runs: int
    cold_seconds: float
    model_seconds: float
    decode_seconds: float
    noop_seconds: float
    noop_cli_seconds: float
    cache_bytes: int


def machine_info() -> str:
    """CPU, threads, library versions and the load average (the machine may be shared)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, safetensors {safetensors.__version__}; load average at "
        f"start {load}"
    )


# -- preprocessing ----------------------------------------------------------------------------


@contextmanager
def timers(targets: dict[str, list[tuple[object, str]]]) -> Iterator[dict[str, float]]:
    """Seconds spent in functions, summed per group while the context is open (over all threads).

    Args:
        targets: ``{group: [(owner, attribute name), ...]}``; each function is wrapped in place and
            restored on exit.
    """
    totals = dict.fromkeys(targets, 0.0)
    originals = [(owner, name, getattr(owner, name)) for pairs in targets.values() for owner, name in pairs]

    def timed(group: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[group] += time.perf_counter() - start

        return wrapper

    for group, pairs in targets.items():
        for owner, name in pairs:
            setattr(owner, name, timed(group, getattr(owner, name)))
    try:
        yield totals
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def make_dataset(root: Path, count: int) -> None:
    """``count`` shapes images of mixed sizes, dated a minute back like any dataset not just written
    (preprocess re-hashes files modified in the last two seconds, whatever their size and mtime)."""
    make_shapes_dataset(root, count, seed=0, sizes=IMAGE_SIZES)
    past = time.time() - 60
    for path in root.iterdir():
        os.utime(path, (past, past))


def bench_preprocess(tmp: Path, count: int, cold_runs: int, noop_runs: int = 3) -> PreprocessResult:
    """Cold preprocess of ``count`` images with the tiny FLUX.1 pipeline (the best of ``cold_runs``,
    each into a new cache), then no-op re-runs: in this process, and one `flowtune preprocess` process."""
    model = make_tiny("flux", tmp / "tiny-flux")

    def write_recipe(name: str, images: int, cache: str) -> Path:
        if not (tmp / name).exists():
            make_dataset(tmp / name, images)
        path = tmp / f"{cache}.yaml"
        path.write_text(
            f"model: {{family: flux, pretrained: '{model}', dtype: float32}}\n"
            f"data: {{source: '{tmp / name}', cache_dir: '{tmp / cache}', resolution: {RESOLUTION}}}\n"
        )
        return path

    quiet = Console(quiet=True)
    preprocess(load_recipe(write_recipe("warmup", 4, "warmup-cache"), []), console=quiet)  # lazy imports
    encoder = get_family("flux").load_encoder_class()
    groups = {
        "model": [(encoder, "load"), (encoder, "encode_images"), (encoder, "encode_prompts")],
        "decode": [(preprocess_module, "load_rgb"), (preprocess_module, "apply_crop")],
    }
    runs = []
    for run in range(cold_runs):
        recipe = load_recipe(write_recipe("dataset", count, f"cache-{run}"), [])
        with timers(groups) as seconds:
            start = time.perf_counter()
            report = preprocess(recipe, console=quiet)
            runs.append((time.perf_counter() - start, seconds["model"], seconds["decode"], report))
    cold, model_seconds, decode_seconds, report = min(runs, key=lambda r: r[0])
    noop = []
    for _ in range(noop_runs):
        start = time.perf_counter()
        again = preprocess(recipe, console=quiet)
        noop.append(time.perf_counter() - start)
        assert again.images_encoded == again.texts_encoded == 0, "the re-run encoded something"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    command = [sys.executable, "-m", "flowtune", "preprocess", str(tmp / f"cache-{cold_runs - 1}.yaml")]
    subprocess.run(command, check=True, env=env, capture_output=True)
    cli = time.perf_counter() - start
    return PreprocessResult(
        items=report.items,
        images_encoded=report.images_encoded,
        texts_encoded=report.texts_encoded,
        cold_runs=cold_runs,
        cold_seconds=cold,
        model_seconds=model_seconds,
        decode_seconds=decode_seconds,
        noop_seconds=min(noop),
        noop_cli_seconds=cli,
        cache_bytes=report.cache_bytes,
    )


# -- loading ----------------------------------------------------------------------------------


def build_cache(root: Path, sizes: EntrySizes, count: int) -> CacheStore:
    """A complete cache of ``count`` items (one image and one text entry each) of random tensors,
    laid out as preprocess lays it out: text shards first, then image shards, ``SHARD_BYTES`` each."""
    store = CacheStore.open(root, create=True)
    generator = torch.Generator().manual_seed(0)

    def rand(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(sizes.dtype)

    def add(key: str, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        store.add(key, kind, tensors)
        if store.pending_bytes >= SHARD_BYTES:
            store.flush()

    for i in range(count):
        add(
            f"text-{i}",
            "text",
            {"text_embeddings": rand(sizes.text), "pooled_prompt_embeds": rand(sizes.pooled)},
        )
    store.flush()
    for i in range(count):
        add(f"image-{i}", "image", {"image_latents": rand(sizes.latents)})
    store.flush()
    items = [
        {"key": f"item-{i}", "image": f"image-{i}", "text": f"text-{i}", "caption": f"caption {i}"}
        for i in range(count)
    ]
    store.manifest.update(
        {"fields": FIELDS, "items": [{**item, "bucket": list(sizes.bucket)} for item in items]}
    )
    store.write_manifest(complete=True)
    return store


def warm_page_cache(store: CacheStore) -> None:
    """Read every shard once, so that the measurements see the page cache, not the disk."""
    for shard in {ref.shard for ref in store.entries.values()}:
        with open(store.root / shard, "rb") as handle:
            while handle.read(64 * 1024**2):
                pass


def raw_epoch(dataset: CachedDataset, batches: list[list[int]]) -> Callable[[], None]:
    """One epoch of the floor: get_tensor + torch.stack in a plain loop, no loader.

    Each shard is opened once with safe_open and kept open across epochs, as the loader's store does.
    """
    store = dataset.store
    fields = [(kind, name) for kind, names in FIELDS.items() for name in names]
    handles: dict[str, object] = {}

    def run() -> None:
        for batch in batches:
            tensors: dict[str, list[torch.Tensor]] = {name: [] for _, name in fields}
            for index in batch:
                item = dataset.items[index]
                for kind, name in fields:
                    shard = store.entries[item[kind]].shard
                    if shard not in handles:
                        handles[shard] = safe_open(store.root / shard, framework="pt", device="cpu")
                    tensors[name].append(handles[shard].get_tensor(f"{item[kind]}/{name}"))
            {name: torch.stack(values) for name, values in tensors.items()}

    return run


def loader_epoch(dataset: CachedDataset, sampler: BucketBatchSampler, workers: int) -> Callable[[], None]:
    """One epoch through a DataLoader as training builds it (persistent workers, started here)."""
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=CacheCollator(dataset.sequence_fields),
        num_workers=workers,
        persistent_workers=workers > 0,
    )

    def run() -> None:
        for _ in loader:
            pass

    run()  # start the workers outside the measurement
    return run


def collate_epochs(dataset: CachedDataset, batches: list[list[int]]) -> dict[str, Callable[[], None]]:
    """Collation alone over one epoch's batches of read samples: ``CacheCollator`` and ``torch.stack``."""
    samples = [[dataset[i] for i in batch] for batch in batches]
    collator = CacheCollator(dataset.sequence_fields)
    tensors = [name for name, value in samples[0][0].items() if isinstance(value, torch.Tensor)]

    def cache_collator() -> None:
        for batch in samples:
            collator(batch)

    def stack() -> None:
        for batch in samples:
            {name: torch.stack([s[name] for s in batch]) for name in tensors}

    return {"CacheCollator": cache_collator, "torch.stack": stack}


def bench_loader(root: Path, sizes: EntrySizes, count: int, rounds: int) -> LoadResult:
    """Batches/s of the raw floor and of the loader per worker count, at ``sizes``; and the
    seconds per batch of collation alone, with :class:`CacheCollator` and with ``torch.stack``.

    The methods take turns, one epoch each per round, so that a noisy neighbour hits them alike;
    each figure is from the best of ``rounds`` epochs.
    """
    store = build_cache(root, sizes, count)
    warm_page_cache(store)
    dataset = CachedDataset(root)
    sampler = BucketBatchSampler(dataset.buckets, BATCH_SIZE, seed=0)
    batches = list(sampler)
    methods = {"raw": raw_epoch(dataset, batches)}
    methods.update({f"workers={w}": loader_epoch(dataset, sampler, w) for w in WORKERS})
    collate = collate_epochs(dataset, batches)
    times: dict[str, list[float]] = {name: [] for name in {**methods, **collate}}
    for fn in (*methods.values(), *collate.values()):
        fn()  # warm-up epoch
    for _ in range(rounds):
        for name, fn in {**methods, **collate}.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rates = {name: len(batches) / min(times[name]) for name in methods}
    return LoadResult(sizes, count, rates, {name: min(times[name]) / len(batches) for name in collate})


# -- report -----------------------------------------------------------------------------------


def render(machine: str, images: int, rounds: int, pre: PreprocessResult, loads: list[LoadResult]) -> str:
    """The ``## Data path`` section as Markdown (ends with a newline)."""
    outside = pre.cold_seconds - pre.model_seconds
    image_sizes = ", ".join(f"{w}x{h}" for w, h in IMAGE_SIZES)
    lines = [
        SECTION,
        "",
        "Measured by `scripts/bench_data.py`; re-run it to refresh this section",
        f"(`python scripts/bench_data.py --write docs/performance.md`). Machine: cpu, {machine}. "
        "Every figure is the best of several runs, the one least disturbed by other processes.",
        "",
        "### Preprocessing",
        "",
        f"A cold `preprocess` of {images} generated shapes images (PNG, {image_sizes} in turn; resolution "
        f"{RESOLUTION}, max_sequence_length 512) "
        f"with the tiny FLUX.1 pipeline caches {pre.items} items ({pre.images_encoded} distinct images, "
        f"{pre.texts_encoded} distinct captions including the empty one; {pre.cache_bytes / 1e6:.1f} MB) "
        f"in {pre.cold_seconds:.2f} s: **{pre.items / pre.cold_seconds:.0f} items/s** (best of "
        f"{pre.cold_runs}, each into a new cache). Of that, {pre.model_seconds:.2f} s are spent loading and "
        f"calling the tiny VAE and text encoders, with the images' decode and crop ({pre.decode_seconds:.2f} "
        f"s of thread time) running in a thread pool alongside; the {outside:.2f} s outside any model call "
        f"(listing, hashing, planning, shard and manifest writes) amount to {pre.items / outside:.0f} items/s.",
        "",
        "The tiny model makes this a measure of flowtune's own overhead (I/O, decode, crop, hashing, "
        "shard writes), not of real VAE or T5 speed: with FLUX.1 [dev] the VAE and T5-XXL dominate. "
        "Imports are excluded (a warm-up run pays them).",
        "",
        f"A no-op re-run (same dataset and recipe, nothing to encode) takes **{pre.noop_seconds * 1000:.0f} "
        f"ms** in the same process and **{pre.noop_cli_seconds:.1f} s** as a new `flowtune preprocess` "
        "process, imports included: files are recognised by size and mtime without being read, no model "
        "is loaded, and only the manifest is rewritten.",
        "",
        "### Loading",
        "",
        f"Batches of {BATCH_SIZE} per second over whole epochs (best of {rounds} epochs; the methods take "
        "turns, so other processes disturb them alike). *raw* is the floor: `safe_open` once per shard, "
        "`get_tensor` of the same tensors and `torch.stack`, in a plain loop. *workers=N* is "
        "`CachedDataset` + `BucketBatchSampler` + `CacheCollator` through a `torch.utils.data.DataLoader` "
        "with `num_workers=N` (persistent workers, started beforehand). The caches are written "
        "synthetically (random tensors, no model) in preprocess's layout, and every shard is read once "
        "before measuring, so the page cache is warm: reads after a cold start are the OS's business.",
        "",
        "| entry sizes | per item | items | raw | " + " | ".join(f"workers={w}" for w in WORKERS) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in WORKERS) + " |",
    ]
    for load in loads:
        sizes = load.sizes
        shapes = f"latents {list(sizes.latents)}, text {list(sizes.text)}, pooled {list(sizes.pooled)}"
        cells = [f"{load.rates['raw']:.0f}/s"] + [
            f"{load.rates[f'workers={w}']:.0f}/s ({load.ratio(f'workers={w}'):.2f}x raw)" for w in WORKERS
        ]
        lines.append(
            f"| {sizes.name}: {shapes}, {str(sizes.dtype).removeprefix('torch.')} | "
            f"{sizes.item_bytes / 1024**2:.2f} MiB | {load.items} | {' | '.join(cells)} |"
        )
    real, tiny = loads
    w = WORKERS[-1]
    added = 1000 / real.rates["workers=0"] - 1000 / real.rates["raw"]
    collate, stack = (real.collate_seconds[k] * 1000 for k in ("CacheCollator", "torch.stack"))
    lines += [
        "",
        f"At {real.sizes.name} sizes the loader in the main process takes {real.ratio('workers=0'):.2f}x the "
        f"raw reads' time ({added:+.2f} ms per batch). Over an epoch of read samples, `CacheCollator` takes "
        f"{collate:.2f} ms per batch against {stack:.2f} ms for a bare `torch.stack` (it stacks sequence "
        "fields of equal length, such as FLUX.1's `max_sequence_length`-long T5 embeddings, and pads only "
        "unequal ones; it also builds their masks).",
        "",
        f"With {w} worker processes it takes {real.ratio(f'workers={w}'):.2f}x the raw reads' time: each batch "
        "reaches the main process through shared memory (a new shared-memory file, its page faults and a "
        f"copy), and here {w} workers and the main process share {os.cpu_count()} cores (hence "
        "`data.num_workers: 0` by default). Either way the "
        f"loader delivers {min(real.rates[f'workers={n}'] for n in WORKERS):.0f} batches/s or more, far "
        "beyond what FLUX.1 training consumes (a [dev] LoRA step at this batch size takes a second or more "
        "even on an H100). At the tiny demo's sizes fixed per-batch costs dominate (the DataLoader's, the "
        "per-item dicts', and with workers the hand-off between processes), and the loader still delivers "
        f"{min(tiny.rates[f'workers={n}'] for n in WORKERS):.0f} batches/s or more.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200, help="Images to preprocess.")
    parser.add_argument("--cache-items", type=int, default=128, help="Items of the FLUX.1-sized cache.")
    parser.add_argument("--tiny-items", type=int, default=512, help="Items of the tiny-sized cache.")
    parser.add_argument("--cold-runs", type=int, default=3, help="Cold preprocess runs (best is kept).")
    parser.add_argument("--rounds", type=int, default=25, help="Timed epochs per loading method.")
    parser.add_argument("--write", type=Path, help="Replace the '## Data path' section of this file.")
    args = parser.parse_args()
    quiet_libraries()
    machine = machine_info()

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        needed = 2 * args.cache_items * REAL.item_bytes
        free = shutil.disk_usage(tmp).free
        if free < needed:
            raise SystemExit(f"{tmp} has {free / 1e9:.1f} GB free; the benchmark needs {needed / 1e9:.1f} GB")
        pre = bench_preprocess(Path(tmp) / "preprocess", args.images, args.cold_runs)
        loads = [
            bench_loader(Path(tmp) / "real", REAL, args.cache_items, args.rounds),
            bench_loader(Path(tmp) / "tiny", TINY, args.tiny_items, args.rounds),
        ]

    section = render(machine, args.images, args.rounds, pre, loads)
    print(section)
    if args.write:
        write_section(args.write, SECTION, section)


if __name__ == "__main__":
    main()
