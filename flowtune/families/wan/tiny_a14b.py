"""Wan 2.2 T2V-A14B's tiny random pipeline: the tiny Wan 2.1 components (:mod:`.tiny`) with a
second, independently seeded transformer and the pipeline's ``boundary_ratio``, as
``Wan-AI/Wan2.2-T2V-A14B-Diffusers`` is laid out: ``WanPipeline`` with ``transformer`` (the
high-noise expert, t >= boundary_ratio * 1000) and ``transformer_2`` (the low-noise expert),
one VAE and one UMT5 (:mod:`flowtune.experts`)."""

from __future__ import annotations

from pathlib import Path

import torch

from flowtune.families.wan.tiny import tiny_wan_components, tiny_wan_transformer
from flowtune.tiny import seeded_components

BOUNDARY_RATIO = 0.875
"""``Wan-AI/Wan2.2-T2V-A14B-Diffusers``' ``boundary_ratio`` (model_index.json)."""


def build_tiny_wan22_a14b(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random two-expert Wan 2.2 A14B-shaped ``WanPipeline`` to ``out_dir``: loads
    with ``WanPipeline.from_pretrained``, weights depend only on ``seed``, the caller's RNG is
    untouched; the two transformers have the same shapes and different weights."""
    from diffusers import WanPipeline

    components = tiny_wan_components(seed)
    # Seeded by its own name, so transformer_2's weights differ from transformer's.
    components.update(seeded_components(seed, {"transformer_2": tiny_wan_transformer}))
    with torch.no_grad():
        WanPipeline(**components, boundary_ratio=BOUNDARY_RATIO).save_pretrained(
            out_dir, safe_serialization=True
        )
