"""A run that runs out of GPU memory, told in one message instead of torch's traceback.

``torch.OutOfMemoryError`` from a training step (or from setting up the run before the first,
validating or saving after one) becomes a :class:`TrainingOutOfMemory` that says where it
happened (the step and the batch's bucket: multi-aspect runs often fail at their largest bucket
after many steps), what the device held then (PyTorch's allocated and reserved bytes, and what the CUDA context and other
processes took), what ``flowtune plan`` had predicted for the run and, when the plan had found a
change that fits, that change; then which checkpoint a resume continues from and the command
that lists every change that fits.

:func:`run_out_of_memory` reads the trainer's state; :meth:`Trainer.run` raises what it returns.
Validation images that run out of memory are skipped with a warning instead
(:mod:`flowtune.train.validation`).
"""

from __future__ import annotations

import math
import re
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from flowtune.console import format_bytes
from flowtune.errors import FlowtuneError


class TrainingOutOfMemory(FlowtuneError):
    """The run ran out of GPU memory; nothing after its newest checkpoint was saved."""


@dataclass(frozen=True)
class DeviceMemory:
    """What a CUDA device held when an allocation failed (bytes).

    Attributes:
        name: The device's name, e.g. ``NVIDIA GeForce RTX 4090``.
        total: Its memory.
        allocated: Bytes PyTorch's tensors held.
        reserved: Bytes PyTorch's caching allocator held (``allocated`` and its cache).
        free: Bytes the driver still had free.
    """

    name: str
    total: int
    allocated: int
    reserved: int
    free: int

    @property
    def elsewhere(self) -> int:
        """Bytes neither free nor PyTorch's: the CUDA context and other processes."""
        return max(0, self.total - self.free - self.reserved)

    @classmethod
    def read(cls, device: torch.device) -> DeviceMemory | None:
        """The device's figures now; None off CUDA."""
        if device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(device)
        return cls(
            torch.cuda.get_device_properties(device).name,
            total,
            torch.cuda.memory_allocated(device),
            torch.cuda.memory_reserved(device),
            free,
        )


_REQUEST = re.compile(r"Tried to allocate ([0-9.]+ [KMGT]?i?B)")


def describe_items(items: list[dict[str, Any]]) -> str:
    """A batch's size from its cache items' manifest entries, e.g. ``a batch of 2 at 1024x768
    px`` or ``a batch of 1 clip of 81 frames at 832x480 px``; a batch never mixes buckets."""
    if not items:
        return "a batch"
    width, height = items[0]["bucket"]
    frames = items[0].get("frames")
    clip = f" clip{'s' if len(items) > 1 else ''} of {frames} frames" if frames and frames > 1 else ""
    return f"a batch of {len(items)}{clip} at {width}x{height} px"


def out_of_memory_message(
    error: BaseException,
    *,
    device: torch.device,
    where: str,
    memory: DeviceMemory | None,
    planned: int | None,
    plan_change: str | None,
    checkpoint: str | None,
    plan_command: str,
) -> str:
    """The one message of a run that ran out of memory (see the module docstring).

    Args:
        error: torch's ``OutOfMemoryError`` (its "Tried to allocate" figure is quoted).
        where: e.g. ``in training step 12 (a batch of 1 at 1024x1024 px)``.
        memory: The device's figures at the failure (None off CUDA).
        planned: ``flowtune plan``'s peak for the run's step (bytes), None without a plan.
        plan_change: The cheapest change the plan found to fit, e.g. ``train.block_offload=12
            (18.0 GiB, slower)``, when it predicted that the run would not fit.
        checkpoint: The checkpoint a resume continues from, described, or None when none was
            saved.
        plan_command: The ``flowtune plan`` command line that lists the changes that fit.
    """
    request = _REQUEST.search(str(error))
    first = f"out of memory on {device} {where}"
    if request is not None:
        first += f", asking for {request.group(1)} more"
    if memory is not None:
        first += (
            f": {memory.name} has {format_bytes(memory.total)}; PyTorch held {format_bytes(memory.allocated)} "
            f"in tensors and {format_bytes(memory.reserved)} in all, the CUDA context and other processes "
            f"{format_bytes(memory.elsewhere)}"
        )
    sentences = [first + "."]
    if planned is not None:
        plan = f"flowtune plan predicted a {format_bytes(planned)} peak for this run's training step"
        if memory is not None and planned <= memory.total:
            plan += (
                " (it fits the GPU: the rest went to the CUDA context, other processes or the plan's error)"
            )
        sentences.append(plan + ".")
    sentences.append(
        f"Nothing after {checkpoint} was saved." if checkpoint else "No checkpoint was saved yet."
    )
    advice = "Free the GPU of other processes or lower the memory the run needs"
    if plan_change:
        advice += f" (the plan's cheapest change: {plan_change})"
    advice += f": `{plan_command}` lists the changes that fit"
    if checkpoint:
        advice += ", then continue with train.resume=latest"
    sentences.append(advice + ".")
    return " ".join(sentences)


def _methods(error: BaseException) -> list[str]:
    """The names of the functions ``error`` went through, outermost first."""
    return [frame.f_code.co_name for frame, _ in traceback.walk_tb(error.__traceback__)]


def run_out_of_memory(trainer: Any, error: BaseException) -> TrainingOutOfMemory:
    """The message of a :class:`~flowtune.train.trainer.Trainer` whose setup or step after
    ``trainer.step`` raised ``error`` (torch's ``OutOfMemoryError``)."""
    phase = next(
        (name for name in _methods(error) if name in ("setup", "train_step", "validate", "save")), None
    )
    if phase == "train_step":
        by_key = {item["key"]: item for item in trainer.dataset.items}
        items = [by_key[key] for key in getattr(trainer, "_batch_keys", []) if key in by_key]
        where = f"in training step {trainer.step + 1} ({describe_items(items)})"
    elif phase == "validate":
        where = f"while validating after step {trainer.step}"
    elif phase == "save":
        where = f"while saving the checkpoint of step {trainer.step}"
    else:
        where = "while setting up the run, before its first step"
    device = torch.device(trainer.device)
    try:
        memory = DeviceMemory.read(device)
    except RuntimeError:  # a device too broken to say: the message goes without its figures
        memory = None
    check = trainer.memory  # flowtune.train.memory_check's plan of the run, when there is one
    planned = check.peak if check is not None else None
    change = check.cheapest_change() if check is not None else None
    checkpoint = None if trainer.last_checkpoint is None else f"checkpoint {trainer.last_checkpoint}"
    recipe = trainer.output_dir / "recipe.yaml"
    command = f"flowtune plan {recipe if recipe.is_file() else 'RECIPE'}"
    if trainer.gpu_memory is not None:  # flowtune train --gpu-memory
        command += f" --gpu-memory {trainer.gpu_memory:g}"
    elif memory is not None:  # GiB, rounded down: the plan must not count on more than there is
        command += f" --gpu-memory {math.floor(memory.total / 1024**3 * 10) / 10:g}"
    return TrainingOutOfMemory(
        out_of_memory_message(
            error,
            device=device,
            where=where,
            memory=memory,
            planned=planned,
            plan_change=change,
            checkpoint=checkpoint,
            plan_command=command,
        )
    )
