"""The FLUX.2 adapter's old import path, kept working: the code lives in
:mod:`flowtune.families.flux2.adapter` (the family's package)."""

from flowtune.families.flux2.adapter import Flux2Adapter

__all__ = ["Flux2Adapter"]
