"""Random draws for flow matching, from one generator or from one generator per sample.

Training reproducibility needs every sample's noise, timestep and caption dropout to depend only
on that sample, not on how a global batch is split across processes or accumulation steps.  The
pipeline therefore accepts ``generator`` as either

* ``None``: torch's global RNG (the reference behaviour),
* a single ``torch.Generator``: one stream for the whole batch,
* a sequence of ``B`` generators: sample ``i`` draws only from ``generator[i]``.

Draws are made on the generator's device and moved to ``device``, so a CPU generator works with
CUDA tensors (bitwise identical results on any accelerator).  Per-sample draws are joined where
they were made and moved in one copy; a CPU-to-CUDA copy goes through pinned memory without
blocking, so drawing on the CPU never makes the host wait for the GPU's queued work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def _check_per_sample(generator: Sequence[torch.Generator], batch_size: int) -> None:
    if len(generator) != batch_size:
        raise ValueError(f"got {len(generator)} per-sample generators for a batch of {batch_size}")


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``; from the CPU to CUDA asynchronously (pinned staging copy)."""
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def rand(batch_size: int, generator: Generators, device: torch.device | str) -> torch.Tensor:
    """Uniform draws in [0, 1).

    Returns:
        Float32 tensor of shape [batch_size] on ``device``.
    """
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return to_device(torch.rand(batch_size, generator=generator, device=gen_device), device)
    _check_per_sample(generator, batch_size)
    return to_device(torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator]), device)


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """Standard normal draws; with per-sample generators, row ``i`` comes from ``generator[i]``.

    Args:
        shape: Full shape, first axis the batch, e.g. [B, C, H, W].

    Returns:
        Float32 tensor of ``shape`` on ``device``.
    """
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return to_device(torch.randn(shape, generator=generator, device=gen_device), device)
    _check_per_sample(generator, shape[0])
    return to_device(
        torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator]), device
    )
