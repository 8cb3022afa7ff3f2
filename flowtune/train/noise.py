"""Per-sample random streams: one generator per (seed, step, global sample index).

The flow-matching step draws each sample's sigma, noise and caption dropout from that sample's
own generator (``FlowMatchingPipeline.step(..., generator=[...])``), so what a sample gets depends
only on the run's seed, the optimizer step and the sample's position among the step's samples,
never on how the step's samples are split into processes, micro-batches or accumulation steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of optimizer step ``step`` of a run seeded ``seed``
    (numpy's SeedSequence mixes the three, so neighbouring values give unrelated streams)."""
    high, low = np.random.SeedSequence([seed, step, index]).generate_state(2, dtype=np.uint32)
    return (int(high) << 31) ^ int(low)


def sample_generators(
    seed: int, step: int, indices: Sequence[int], device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per sample, for the given global sample indices of ``step``.

    Args:
        seed: ``train.seed``.
        step: The optimizer step the samples belong to.
        indices: The samples' positions among all samples of the step: for process ``rank``
            holding B samples of accumulation round ``a``, ``a * G + rank * B + arange(B)``, where
            G = B x processes is the global batch size.
        device: Where the generators draw (the latents' device).
    """
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, step, i)) for i in indices]
