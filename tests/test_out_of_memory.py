"""A run that runs out of GPU memory is told in one message (flowtune.train.out_of_memory); the
command-line path (exit status 2, no traceback, the step, its batch and the checkpoint) is in
tests/test_exit_codes.py."""

from __future__ import annotations

import torch

from flowtune.train.out_of_memory import DeviceMemory, describe_items, out_of_memory_message

GIB = 1024**3
OOM = torch.OutOfMemoryError(
    "CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 24 GiB"
)


def _message(**changes) -> str:
    arguments = {
        "device": torch.device("cuda", 0),
        "where": "in training step 12 (a batch of 1 at 1024x1024 px)",
        "memory": DeviceMemory("NVIDIA GeForce RTX 4090", 24 * GIB, 21 * GIB, 22 * GIB, GIB // 2),
        "planned": 20 * GIB,
        "plan_change": None,
        "checkpoint": "checkpoint run/checkpoints/step-000010",
        "plan_command": "flowtune plan run/recipe.yaml --gpu-memory 24",
        **changes,
    }
    return out_of_memory_message(OOM, **arguments)


def test_the_message_says_what_the_gpu_held_what_was_planned_and_where_to_continue() -> None:
    assert _message() == (
        "out of memory on cuda:0 in training step 12 (a batch of 1 at 1024x1024 px), asking for 1.50 GiB "
        "more: NVIDIA GeForce RTX 4090 has 24.0 GiB; PyTorch held 21.0 GiB in tensors and 22.0 GiB in "
        "all, the CUDA context and other processes 1.5 GiB. flowtune plan predicted a 20.0 GiB peak for "
        "this run's training step (it fits the GPU: the rest went to the CUDA context, other processes or "
        "the plan's error). Nothing after checkpoint run/checkpoints/step-000010 was saved. Free the GPU "
        "of other processes or lower the memory the run needs: `flowtune plan run/recipe.yaml "
        "--gpu-memory 24` lists the changes that fit, then continue with train.resume=latest."
    )


def test_a_plan_that_did_not_fit_names_its_cheapest_change() -> None:
    message = _message(
        planned=30 * GIB, plan_change="train.block_offload=20 (21.0 GiB, slower)", checkpoint=None
    )
    assert "flowtune plan predicted a 30.0 GiB peak for this run's training step. No checkpoint" in message
    assert "(the plan's cheapest change: train.block_offload=20 (21.0 GiB, slower))" in message
    assert "resume" not in message


def test_batches_are_described_by_their_bucket_and_clip_length() -> None:
    still = {"key": "a", "bucket": [1024, 768]}
    clip = {"key": "b", "bucket": [832, 480], "frames": 81}
    assert describe_items([still, still]) == "a batch of 2 at 1024x768 px"
    assert describe_items([clip]) == "a batch of 1 clip of 81 frames at 832x480 px"
    assert describe_items([{**clip, "frames": 1}]) == "a batch of 1 at 832x480 px"
