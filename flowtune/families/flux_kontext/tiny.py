"""FLUX.1 Kontext's tiny random pipeline (``flowtune make-tiny flux-kontext``): FLUX.1's."""

from __future__ import annotations

from pathlib import Path

from flowtune.families.flux.tiny import build_tiny_flux


def build_tiny_flux_kontext(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random FLUX.1 Kontext [dev]-shaped pipeline (``FluxKontextPipeline``): the
    components of :func:`build_tiny_flux`, which Kontext shares with FLUX.1."""
    build_tiny_flux(out_dir, seed, pipeline_class="FluxKontextPipeline")
