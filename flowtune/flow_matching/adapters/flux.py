"""The FLUX.1 adapter's old import path, kept working: the code lives in
:mod:`flowtune.families.flux.adapter` (the family's package)."""

from flowtune.families.flux.adapter import FluxAdapter, model_guidance

__all__ = ["FluxAdapter", "model_guidance"]
