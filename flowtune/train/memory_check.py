"""Before a run loads its model: the plan's peak for its training step, and a warning when the
GPU it runs on (or the one ``flowtune train --gpu-memory`` names) is too small for it.

The figure is :func:`flowtune.memory.plan.trace_recipe`'s (fake tensors, from the transformer's
config alone, no weights), so the warning comes before any weight is downloaded or loaded, with
the changes that would fit (:func:`flowtune.memory.plan.changes_to_fit`).  On a CPU run without
``--gpu-memory`` there is no GPU to fit and nothing is planned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flowtune.console import format_bytes
from flowtune.errors import FlowtuneError
from flowtune.families import FamilySpec


@dataclass
class MemoryCheck:
    """What the plan says about a run.

    Attributes:
        gpu_bytes: The GPU's memory (from ``--gpu-memory`` or the device).
        gpu_name: How the banner names it (``--gpu-memory 24`` or the device's name).
        peak: The planned peak of a training step (bytes), or None when there is no plan.
        note: Why there is no plan (``peak`` None).
        changes: Changes that fit when ``peak`` does not.
    """

    gpu_bytes: int
    gpu_name: str
    peak: int | None = None
    note: str = ""
    changes: list[Any] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.peak is None else self.peak <= self.gpu_bytes

    def banner(self) -> str:
        """The banner's ``planned memory`` row."""
        if self.peak is None:
            return f"no plan ({self.note})"
        return f"{format_bytes(self.peak)} peak per GPU (flowtune plan); {self.gpu_name}: {format_bytes(self.gpu_bytes)}"

    def cheapest_change(self) -> str | None:
        """The first of ``changes``, e.g. ``train.block_offload=12 (18.0 GiB, slower)``; None
        without one."""
        if not self.changes:
            return None
        best = self.changes[0]
        return f"{' '.join(best.overrides)} ({format_bytes(best.peak)}, {best.cost})"

    def warning(self) -> str | None:
        """One warning line when the plan says the step will not fit, else None."""
        if self.fits is not False:
            return None
        line = (
            f"flowtune plan predicts a {format_bytes(self.peak)} peak per GPU for this run's training step, "
            f"more than the {format_bytes(self.gpu_bytes)} of {self.gpu_name}: it will likely run out of memory"
        )
        if self.changes:
            line += f"; {self.cheapest_change()} fits"
            line += "; `flowtune plan RECIPE KEY=VALUE... --gpu-memory N` lists more"
        else:
            line += "; lower data.resolution or train.batch_size"
        return line


def check_memory(
    recipe: Any, spec: FamilySpec, device: Any, gpu_memory_gib: float | None, num_processes: int = 1
) -> MemoryCheck | None:
    """Plan ``recipe``'s training step against the GPU's memory.

    Args:
        device: The run's device; on CUDA its memory is read unless ``gpu_memory_gib`` is given.
        gpu_memory_gib: ``flowtune train --gpu-memory``: the memory to plan against (GiB).
        num_processes: FSDP2 shards what the plan counts whole, so it is not planned on several.

    Returns:
        None without a GPU to plan against (a CPU run without ``--gpu-memory``).
    """
    import torch

    from flowtune.memory.plan import GIB, changes_to_fit, trace_recipe

    if gpu_memory_gib is not None:
        check = MemoryCheck(int(gpu_memory_gib * GIB), f"--gpu-memory {gpu_memory_gib:g}")
    elif torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        check = MemoryCheck(int(props.total_memory), props.name)
    else:
        return None
    if recipe.train.mode != "lora":
        check.note = "flowtune plan covers train.mode=lora only"
        return check
    if recipe.train.distributed == "fsdp" and num_processes > 1:
        check.note = "flowtune plan does not model FSDP2's sharding"
        return check
    try:
        trace = trace_recipe(recipe, spec)
    except FlowtuneError as exc:
        check.note = str(exc)
        return check
    except Exception as exc:  # noqa: BLE001 - a plan that cannot be traced must not stop the run
        check.note = (
            f"the plan could not trace this model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        )
        return check
    check.peak = trace.plan(recipe, spec).peak
    if check.peak > check.gpu_bytes:
        check.changes = changes_to_fit(recipe, spec, trace, check.gpu_bytes, limit=1)
    return check
