"""The bucket batch sampler and the collator (the cached dataset is tested with preprocess)."""

from __future__ import annotations

import pytest
import torch

from flowtune.data.loader import BucketBatchSampler, CacheCollator

# 3 buckets of 5, 3 and 1 items, interleaved as a real dataset would list them.
BUCKETS = ["a", "b", "a", "c", "a", "b", "a", "a", "b"]


def _epoch(sampler: BucketBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_batches_never_mix_buckets_and_cover_every_item() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=2, seed=0)
    batches = _epoch(sampler, 0)
    assert all(len(b) == 2 for b in batches)
    assert all(len({BUCKETS[i] for i in b}) == 1 for b in batches)
    assert set().union(*map(set, batches)) == set(range(len(BUCKETS)))
    # ceil(5/2) + ceil(3/2) + ceil(1/2) batches; incomplete ones are filled from their own bucket.
    assert len(batches) == len(sampler) == 3 + 2 + 1


def test_order_is_deterministic_per_seed_and_epoch() -> None:
    first = _epoch(BucketBatchSampler(BUCKETS, 2, seed=7), 3)
    again = _epoch(BucketBatchSampler(BUCKETS, 2, seed=7), 3)
    assert first == again
    assert first != _epoch(BucketBatchSampler(BUCKETS, 2, seed=7), 4)
    assert first != _epoch(BucketBatchSampler(BUCKETS, 2, seed=8), 3)


def test_position_resumes_exactly() -> None:
    reference = BucketBatchSampler(BUCKETS, 2, seed=1)
    stream = _epoch(reference, 0) + _epoch(reference, 1) + _epoch(reference, 2)
    for consumed in (0, 4, 6, 7, 13):
        resumed = BucketBatchSampler(BUCKETS, 2, seed=1)
        resumed.set_position(consumed)
        rest = list(resumed)
        epoch, start = divmod(consumed, reference.batches_per_epoch)
        assert resumed.state_dict()["epoch"] == epoch
        assert len(resumed) == reference.batches_per_epoch - start
        assert rest == stream[consumed : (epoch + 1) * reference.batches_per_epoch]


@pytest.mark.parametrize("replicas", [2, 3])
def test_processes_share_whole_global_batches(replicas: int) -> None:
    single = BucketBatchSampler(BUCKETS, batch_size=replicas * 2, seed=5)
    shards = [BucketBatchSampler(BUCKETS, 2, seed=5, num_replicas=replicas, rank=r) for r in range(replicas)]
    for epoch in (0, 1):
        whole = _epoch(single, epoch)
        parts = [_epoch(s, epoch) for s in shards]
        assert all(len(p) == len(whole) for p in parts)
        for step, batch in enumerate(whole):
            assert sum((p[step] for p in parts), []) == batch


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="empty"):
        BucketBatchSampler([], 1)
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(BUCKETS, 1, num_replicas=2, rank=2)


def test_collator_stacks_fixed_fields_and_pads_sequences_with_a_mask() -> None:
    samples = [
        {"image_latents": torch.ones(4, 2, 2), "text": torch.ones(3, 5), "key": "k0", "caption": "x"},
        {"image_latents": torch.zeros(4, 2, 2), "text": torch.full((1, 5), 2.0), "key": "k1", "caption": "y"},
    ]
    batch = CacheCollator(["text"])(samples)
    assert batch["image_latents"].shape == (2, 4, 2, 2)
    assert batch["text"].shape == (2, 3, 5)
    assert batch["text_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(batch["text"][1, 0], torch.full((5,), 2.0))
    assert batch["text"][1, 1:].abs().sum() == 0
    assert batch["keys"] == ["k0", "k1"] and batch["captions"] == ["x", "y"]
    same = CacheCollator(["text"])([samples[0], samples[0]])
    assert same["text"].shape == (2, 3, 5) and "text_mask" not in same  # nothing padded
