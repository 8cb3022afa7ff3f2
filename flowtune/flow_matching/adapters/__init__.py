"""Model adapters (see :class:`ModelAdapter`): the shared base here, each family's adapter in its
package (``flowtune/families/<name>/adapter.py``).

The family adapters' names are still importable from here; they are imported on first use
(PEP 562), so that a family's adapter module can import :mod:`.base` without a cycle.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from flowtune.flow_matching.adapters.base import FlowMatchingContext, ModelAdapter
from flowtune.flow_matching.adapters.simple import SimpleAdapter

if TYPE_CHECKING:
    from flowtune.families.flux.adapter import FluxAdapter
    from flowtune.families.flux2.adapter import Flux2Adapter
    from flowtune.families.flux_kontext.adapter import FluxKontextAdapter


# The registered families' adapter classes by class name: {"FluxAdapter": "module:FluxAdapter"}.
def _family_adapters() -> dict[str, str]:
    from flowtune.families import FAMILIES

    return {spec.adapter_class.partition(":")[2]: spec.adapter_class for spec in FAMILIES.values()}


def __getattr__(name: str) -> Any:
    """A family's adapter class, by its class name, imported on first use."""
    reference = _family_adapters().get(name)
    if reference is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = reference.partition(":")
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_family_adapters()})


__all__ = [
    "FlowMatchingContext",
    "Flux2Adapter",
    "FluxAdapter",
    "FluxKontextAdapter",
    "ModelAdapter",
    "SimpleAdapter",
]
