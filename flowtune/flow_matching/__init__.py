"""Flow-matching training core: the model-agnostic pipeline and the per-family adapters.

The public API follows the reference flow-matching pipeline (see docs/flow_matching.md).
"""

from flowtune.flow_matching.adapters import (
    FlowMatchingContext,
    Flux2Adapter,
    FluxAdapter,
    FluxKontextAdapter,
    ModelAdapter,
    SimpleAdapter,
)
from flowtune.flow_matching.pipeline import (
    LOSS_WEIGHTING_SCHEMES,
    TIMESTEP_SAMPLING_METHODS,
    FlowMatchingPipeline,
    LinearInterpolationSchedule,
    LossExplosionError,
    create_adapter,
    create_pipeline,
)

__all__ = [
    "LOSS_WEIGHTING_SCHEMES",
    "TIMESTEP_SAMPLING_METHODS",
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
