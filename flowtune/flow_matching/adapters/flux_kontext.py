"""The FLUX.1 Kontext adapter's old import path, kept working: the code lives in
:mod:`flowtune.families.flux_kontext.adapter` (the family's package)."""

from flowtune.families.flux_kontext.adapter import FluxKontextAdapter

__all__ = ["FluxKontextAdapter"]
