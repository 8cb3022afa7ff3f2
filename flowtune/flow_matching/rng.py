"""Random draws for flow matching, from one generator or from one generator per sample.

Training reproducibility needs every sample's noise, timestep and caption dropout to depend only
on that sample, not on how a global batch is split across processes or accumulation steps.  The
pipeline therefore accepts ``generator`` as either

* ``None``: torch's global RNG (the reference behaviour),
* a single ``torch.Generator``: one stream for the whole batch,
* a sequence of ``B`` generators: sample ``i`` draws only from ``generator[i]``.

Draws are made on the generator's device and moved to ``device``, so a CPU generator works with
CUDA tensors (bitwise identical results on any accelerator).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def _check_per_sample(generator: Sequence[torch.Generator], batch_size: int) -> None:
    if len(generator) != batch_size:
        raise ValueError(f"got {len(generator)} per-sample generators for a batch of {batch_size}")


def rand(batch_size: int, generator: Generators, device: torch.device | str) -> torch.Tensor:
    """Uniform draws in [0, 1).

    Returns:
        Float32 tensor of shape [batch_size] on ``device``.
    """
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.rand(batch_size, generator=generator, device=gen_device).to(device)
    _check_per_sample(generator, batch_size)
    return torch.cat([torch.rand(1, generator=g, device=g.device).to(device) for g in generator])


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
        return torch.randn(shape, generator=generator, device=gen_device).to(device)
    _check_per_sample(generator, shape[0])
    return torch.cat(
        [torch.randn((1, *shape[1:]), generator=g, device=g.device).to(device) for g in generator]
    )
