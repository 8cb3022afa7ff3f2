"""Reading the cache for training: the cached dataset, the bucket batch sampler and the collator.

- :class:`CachedDataset` returns one item's tensors (image entry + text entry, and the control
  entries of an edit pair) from the shards, memory-mapped by safetensors; it never decodes an
  image or runs an encoder.
- :class:`BucketBatchSampler` yields batches whose items share one bucket (so latents stack),
  in an order that depends only on ``(seed, epoch)`` and the *global* batch size, and shards each
  global batch across processes.  Its position is a single number (batches consumed), so a
  resumed run continues with exactly the batches it would have seen.
- :class:`CacheCollator` stacks fixed-size fields and pads variable-length sequence fields
  (e.g. text embeddings of families whose encoders do not pad) with a boolean mask.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from flowtune.data.buckets import FrameBucket
from flowtune.data.store import CacheStore

CONTROL_FIELD = "image_latents"
"""The field of a control entry (what preprocess stores for each control image)."""


def control_key(index: int) -> str:
    """The batch key of an item's ``index``-th control image's latents: ``control_latents_<index>``."""
    return f"control_latents_{index}"


def split_validation(item_keys: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """Split items into training and held-out validation indices (``data.validation_split``).

    An item is held out by the hash of its key, not its position, so the split of the items
    already in a cache stays the same when other items are added or removed, and it does not
    depend on the seed.

    Args:
        item_keys: The cache items' keys, in manifest order.
        fraction: Share of items held out, in [0, 1); any fraction > 0 holds out at least one.

    Returns:
        (training indices, validation indices), each in manifest order.

    Raises:
        ValueError: the split would leave no training item.
    """
    if fraction <= 0:
        return list(range(len(item_keys))), []
    count = max(1, round(len(item_keys) * fraction))
    if count >= len(item_keys):
        raise ValueError(
            f"data.validation_split={fraction} would hold out all {len(item_keys)} items; lower it"
        )
    by_hash = sorted(range(len(item_keys)), key=lambda i: hashlib.sha256(item_keys[i].encode()).digest())
    held_out = set(by_hash[:count])
    train = [i for i in range(len(item_keys)) if i not in held_out]
    return train, sorted(held_out)


def _group_name(group: Hashable) -> str:
    """A batch group as the user knows it: ``64x64``, or ``64x64 + 32x32`` with control sizes."""
    if isinstance(group, tuple) and len(group) == 2 and all(isinstance(side, int) for side in group):
        return f"{group[0]}x{group[1]}"
    if isinstance(group, tuple) and len(group) == 2 and isinstance(group[1], tuple):
        return " + ".join(_group_name(part) for part in (group[0], *group[1]))
    return str(group)


def repeated_items_warning(
    groups: Sequence[Hashable], batch_size: int, num_replicas: int = 1, listed: int = 6
) -> str | None:
    """The warning for a global batch larger than every batch group (bucket): each global batch
    holds the items of one bucket (:class:`BucketBatchSampler`), so every batch would then repeat
    items; None when the largest bucket fills a global batch.

    Args:
        groups: Each item's batch group (:attr:`CachedDataset.batch_groups`).
        batch_size: ``train.batch_size`` (per process).
        num_replicas: Processes sharing each global batch.
        listed: How many of the largest buckets the message names.
    """
    counts = Counter(groups)
    largest = max(counts.values(), default=0)
    global_batch = batch_size * num_replicas
    if not counts or global_batch <= largest:
        return None
    by_size = sorted(counts.items(), key=lambda kv: (-kv[1], repr(kv[0])))
    names = ", ".join(f"{_group_name(group)}: {count}" for group, count in by_size[:listed])
    more = f", ... ({len(by_size) - listed} more)" if len(by_size) > listed else ""
    if num_replicas == 1:
        batch = f"train.batch_size={batch_size}"
    else:
        batch = f"train.batch_size={batch_size} x {num_replicas} processes = a global batch of {global_batch}"
    if largest >= num_replicas:
        fix = (
            f"lower train.batch_size to {largest // num_replicas} or less (raise "
            "train.gradient_accumulation to keep the samples per step)"
        )
    else:
        fix = f"use {largest} processes or fewer, or add images of that shape"
    return (
        f"{batch} but the largest bucket has {largest} items (buckets: {names}{more}); every batch "
        f"repeats items, since a batch never mixes buckets: {fix}"
    )


class CachedDataset(Dataset):
    """The items of a preprocessed cache.

    Each item is ``{field: tensor}`` for the image fields (FLUX.1: ``image_latents`` [C, h, w])
    and the text fields (FLUX.1: ``text_embeddings`` [L, D], ``pooled_prompt_embeds`` [D]) plus
    ``key`` (the item key) and ``caption``.  An edit pair (FLUX.1 Kontext) also has
    ``control_latents_0``, ``control_latents_1``, ... [C, hc_k, wc_k]: its control images' latents
    in reference order, each at the size preprocess resized that control image to.  An item of a
    video family (its manifest entry has ``frames``) has ``video_latents`` [C, F', h, w] (F' = 1
    for a still image) and ``data_type``: ``"video"``, or ``"image"`` for a one-frame clip (so
    that the flow-matching pipeline never trains a single frame image-to-video).

    Args:
        cache: The cache directory or an open :class:`CacheStore`.
        indices: The manifest items to expose (default: all), e.g. a training split.
    """

    def __init__(self, cache: str | Path | CacheStore, indices: Sequence[int] | None = None):
        self.store = cache if isinstance(cache, CacheStore) else CacheStore.open(cache)
        all_items = self.store.manifest.get("items", [])
        self.items: list[dict[str, Any]] = (
            list(all_items) if indices is None else [all_items[i] for i in indices]
        )
        fields = self.store.manifest.get("fields", {})
        self.image_fields: dict[str, bool] = dict(fields.get("image", {}))
        self.text_fields: dict[str, bool] = dict(fields.get("text", {}))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """Each item's bucket as (width, height) in pixels."""
        return [tuple(item["bucket"]) for item in self.items]

    @property
    def batch_groups(self) -> list[Hashable]:
        """Each item's batch group for :class:`BucketBatchSampler`: items of one group stack into
        a batch.  The bucket (width, height) for plain items (the same as :attr:`buckets`);
        ``(bucket, ((wc_0, hc_0), (wc_1, hc_1), ...))`` for edit pairs, so that a batch never
        mixes the number or the sizes of control images.  Items of a video family are grouped by
        :class:`~flowtune.data.buckets.FrameBucket` (frames, width, height)."""
        groups: list[Hashable] = []
        for item in self.items:
            bucket: Hashable = tuple(item["bucket"])
            if "frames" in item:
                bucket = FrameBucket(int(item["frames"]), *item["bucket"])
            controls = item.get("controls")
            groups.append((bucket, tuple(tuple(c["size"]) for c in controls)) if controls else bucket)
        return groups

    @property
    def sequence_fields(self) -> list[str]:
        """Fields whose first dimension varies per item (padded by :class:`CacheCollator`)."""
        return [name for name, seq in {**self.image_fields, **self.text_fields}.items() if seq]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        tensors = self.store.read(item["image"], self.image_fields)
        tensors.update(self.store.read(item["text"], self.text_fields))
        for index, control in enumerate(item.get("controls", ())):
            tensors[control_key(index)] = self.store.read(control["key"], [CONTROL_FIELD])[CONTROL_FIELD]
        if "frames" in item:
            tensors["data_type"] = "video" if item["frames"] > 1 else "image"
        return {**tensors, "key": item["key"], "caption": item["caption"]}

    def text_entry(self, key: str) -> dict[str, torch.Tensor]:
        """The text fields of a text entry, each with a leading batch dimension of 1."""
        return {name: t.unsqueeze(0) for name, t in self.store.read(key, self.text_fields).items()}

    def prompt_embeddings(self, prompt: str) -> dict[str, torch.Tensor]:
        """The cached encoding of a validation prompt (or ``""``), batch dimension 1.

        Raises:
            KeyError: the prompt was not encoded by preprocess.
        """
        key = (
            self.store.manifest["empty_prompt"]
            if prompt == ""
            else self.store.manifest["validation_prompts"][prompt]
        )
        return self.text_entry(key)


class CacheCollator:
    """Collates cached items into a batch.

    Fixed-size fields are stacked to [B, ...]. Each sequence field ``name`` [L_i, ...] is padded
    at the end with zeros to [B, max L_i, ...] and, when the lengths differ, gets
    ``name + "_mask"``: [B, max L_i] bool, True on real positions.  A batch of equal lengths has
    no mask (every position is real), so adapters know from the key alone, without reading a
    device tensor back, whether there is padding.  ``key`` and ``caption`` become lists;
    ``data_type`` (video families) stays one string: a batch never mixes clip lengths.
    """

    def __init__(self, sequence_fields: Sequence[str] = ()):
        self.sequence_fields = set(sequence_fields)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for name, value in samples[0].items():
            values = [s[name] for s in samples]
            if name == "data_type":
                if len(set(values)) != 1:
                    raise ValueError(f"a batch mixes data types {sorted(set(values))}")
                batch[name] = value
            elif not isinstance(value, torch.Tensor):
                batch[name + "s" if name in ("key", "caption") else name] = values
            elif name in self.sequence_fields:
                lengths = [v.shape[0] for v in values]
                # Equal lengths (FLUX.1's T5 output is always max_sequence_length long): a plain
                # stack, which skips pad_sequence's zero-filled buffer and copy.
                if len(set(lengths)) == 1:
                    batch[name] = torch.stack(values)
                else:
                    batch[name] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True)
                    positions = torch.arange(batch[name].shape[1])[None, :]
                    batch[name + "_mask"] = positions < torch.tensor(lengths)[:, None]
            else:
                batch[name] = torch.stack(values)
        return batch


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that never mix buckets, deterministic per (seed, epoch).

    One epoch: the items of each bucket are shuffled and cut into *global* batches of
    ``batch_size * num_replicas`` items; a bucket's last, incomplete global batch is filled up
    with items from the start of the same shuffled bucket, so every item is seen at least once
    per epoch and every batch is full; then the global batches of all buckets are shuffled
    together.  Process ``rank`` takes slice ``[rank * batch_size, (rank + 1) * batch_size)`` of
    every global batch, so the samples of a step are the same for any split of the global batch
    across processes.

    The position is the number of (global) batches consumed since epoch 0
    (:meth:`set_position`), so resuming needs one integer.

    Args:
        buckets: Each dataset item's bucket (any hashable, e.g. ``(width, height)``).
        batch_size: Items per batch on this process.
        seed: Seed of the order (``train.seed``).
        num_replicas: Number of processes sharing each global batch.
        rank: This process's index in ``[0, num_replicas)``.
    """

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid batch_size={batch_size}, num_replicas={num_replicas}, rank={rank}")
        if not buckets:
            raise ValueError("the dataset is empty")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        groups: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(buckets):
            groups.setdefault(bucket, []).append(index)
        # Sorted by bucket so the order never depends on dict insertion order.
        self._groups = [groups[b] for b in sorted(groups, key=repr)]
        self.global_batch_size = batch_size * num_replicas
        self.batches_per_epoch = sum(-(-len(g) // self.global_batch_size) for g in self._groups)
        self.epoch = 0
        self.start_batch = 0

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch``, in order (each of ``global_batch_size`` indices)."""
        rng = np.random.default_rng([self.seed, epoch])
        size = self.global_batch_size
        batches: list[list[int]] = []
        for group in self._groups:
            order = [group[i] for i in rng.permutation(len(group))]
            count = -(-len(order) // size)
            padded = [order[i % len(order)] for i in range(count * size)]
            batches.extend(padded[i * size : (i + 1) * size] for i in range(count))
        return [batches[i] for i in rng.permutation(len(batches))]

    def set_position(self, batches_consumed: int) -> None:
        """Continue after ``batches_consumed`` global batches (counted from epoch 0, batch 0)."""
        self.epoch, self.start_batch = divmod(batches_consumed, self.batches_per_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Start at the beginning of ``epoch``."""
        self.epoch, self.start_batch = epoch, 0

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "start_batch", "seed", "global_batch_size"}`` of the next iteration."""
        return {
            "epoch": self.epoch,
            "start_batch": self.start_batch,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
        }

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches(self.epoch)[self.start_batch :]:
            yield batch[lo:hi]
