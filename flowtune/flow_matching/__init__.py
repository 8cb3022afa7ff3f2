"""Flow-matching training core: the model-agnostic pipeline and the per-family adapters.

The public API follows the reference flow-matching pipeline (see docs/flow_matching.md).  Names
are imported on first use, so that importing a torch-free submodule (``choices``) does not
import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from flowtune.flow_matching.choices import LOSS_WEIGHTING_SCHEMES, TIMESTEP_SAMPLING_METHODS

if TYPE_CHECKING:
    from flowtune.flow_matching.adapters import (
        FlowMatchingContext,
        Flux2Adapter,
        FluxAdapter,
        FluxKontextAdapter,
        ModelAdapter,
        SimpleAdapter,
    )
    from flowtune.flow_matching.pipeline import (
        AdapterArgumentsError,
        FlowMatchingPipeline,
        LinearInterpolationSchedule,
        LossExplosionError,
        create_adapter,
        create_pipeline,
    )

_ADAPTERS = "flowtune.flow_matching.adapters"
_PIPELINE = "flowtune.flow_matching.pipeline"
_LAZY = {
    "FlowMatchingContext": _ADAPTERS,
    "Flux2Adapter": _ADAPTERS,
    "FluxAdapter": _ADAPTERS,
    "FluxKontextAdapter": _ADAPTERS,
    "ModelAdapter": _ADAPTERS,
    "SimpleAdapter": _ADAPTERS,
    "AdapterArgumentsError": _PIPELINE,
    "FlowMatchingPipeline": _PIPELINE,
    "LinearInterpolationSchedule": _PIPELINE,
    "LossExplosionError": _PIPELINE,
    "create_adapter": _PIPELINE,
    "create_pipeline": _PIPELINE,
}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "LOSS_WEIGHTING_SCHEMES",
    "TIMESTEP_SAMPLING_METHODS",
    "AdapterArgumentsError",
    "FlowMatchingContext",
    "FlowMatchingPipeline",
    "Flux2Adapter",
    "FluxAdapter",
    "FluxKontextAdapter",
    "LinearInterpolationSchedule",
    "LossExplosionError",
    "ModelAdapter",
    "SimpleAdapter",
    "create_adapter",
    "create_pipeline",
]
