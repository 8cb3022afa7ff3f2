"""Model adapters: one file per model family (see :class:`ModelAdapter`)."""

from flowtune.flow_matching.adapters.base import FlowMatchingContext, ModelAdapter
from flowtune.flow_matching.adapters.flux import FluxAdapter
from flowtune.flow_matching.adapters.flux2 import Flux2Adapter
from flowtune.flow_matching.adapters.flux_kontext import FluxKontextAdapter
from flowtune.flow_matching.adapters.simple import SimpleAdapter

__all__ = [
    "FlowMatchingContext",
    "Flux2Adapter",
    "FluxAdapter",
    "FluxKontextAdapter",
    "ModelAdapter",
    "SimpleAdapter",
]
