"""The model-family registry: everything model-specific that shared code needs to know.

Shared code (recipes, the data cache, the trainer, sampling, export, the CLI) never branches on a
family name; it looks the family up here.  Each family is one package ``flowtune/families/<name>/``:

- ``__init__.py``: its registry entry, ``SPEC`` (a :class:`FamilySpec`), and default LoRA targets;
- ``adapter.py``: its flow-matching adapter (:class:`flowtune.flow_matching.ModelAdapter`);
- ``encoder.py``: its VAE and text encoding (:class:`flowtune.encoders.FamilyEncoder`);
- ``naming.py``: its LoRA naming tables for kohya / ComfyUI export (if it has them);
- ``quantize.py``: what ``model.quantize`` / ``model.encoder_quantize`` keep unquantized;
- ``tiny.py``: its offline tiny random pipeline (``flowtune make-tiny``).

Adding a family means one such package and its name in ``_PACKAGES`` below.  Only the package's
``__init__`` and ``quantize`` modules are imported here (no torch); the rest is imported on use,
through the ``"module:attribute"`` references of its spec.
"""

from __future__ import annotations

from importlib import import_module

from flowtune.errors import FlowtuneError
from flowtune.families.spec import FamilySpec

# The family packages, in registration order (the order of listings and of ``model.family``'s
# choices).
_PACKAGES = (
    "flux",
    "flux_kontext",
    "flux2",
    "flux2_klein",
    "z_image",
    "qwen_image",
    "qwen_image_edit",
    "wan",
    "hunyuan_video",
)


def _load_families() -> dict[str, FamilySpec]:
    specs = [import_module(f"{__name__}.{package}").SPEC for package in _PACKAGES]
    return {spec.name: spec for spec in specs}


FAMILIES: dict[str, FamilySpec] = _load_families()


# The recipe's ``model.family`` when it names none.
DEFAULT_FAMILY = "flux"


def family_names() -> list[str]:
    """The registered family names, in registration order."""
    return list(FAMILIES)


def reference_family_names() -> list[str]:
    """The registered families that condition on reference images (``FamilySpec.reference_images``)."""
    return [name for name, spec in FAMILIES.items() if spec.reference_images]


def get_family(name: str) -> FamilySpec:
    """Look up a family; raise a :class:`FlowtuneError` naming the known ones if it is unknown."""
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(FAMILIES)
        raise FlowtuneError(f"unknown model family {name!r}; known families: {known}") from None


def find_family_for_pipeline(pipeline_class: str) -> FamilySpec | None:
    """The family whose model folders name ``pipeline_class`` in their model_index.json, or None."""
    for spec in FAMILIES.values():
        if pipeline_class in spec.pipeline_classes:
            return spec
    return None


def family_for_pipeline(pipeline_class: str) -> FamilySpec:
    """The family whose diffusers pipeline class is ``pipeline_class`` (from a model_index.json)."""
    spec = find_family_for_pipeline(pipeline_class)
    if spec is None:
        raise FlowtuneError(f"flowtune does not support {pipeline_class} models; it supports {_supported()}")
    return spec


def check_pipeline_family(spec: FamilySpec, pipeline_class: str, where: str) -> None:
    """Refuse a model folder whose pipeline class (its model_index.json ``_class_name``) is not
    one of ``spec``'s, before any of its components is loaded.

    Args:
        spec: The family the recipe names (``model.family``).
        pipeline_class: The folder's ``_class_name``.
        where: How the message names the folder, e.g. ``"model.pretrained '/models/flux'"``.

    Raises:
        FlowtuneError: one line naming the folder's pipeline class and family, and the recipe's.
    """
    if pipeline_class in spec.pipeline_classes:
        return
    found = find_family_for_pipeline(pipeline_class)
    if found is not None:
        raise FlowtuneError(
            f"{where} holds a {pipeline_class} (family {found.name}), but the recipe says model.family: "
            f"{spec.name}; set model.family: {found.name}, or give a {spec.pipeline_class} model"
        )
    raise FlowtuneError(
        f"{where} holds a {pipeline_class}, which flowtune does not support; model.family {spec.name} "
        f"needs a {spec.pipeline_class} model (flowtune supports {_supported()})"
    )


def _supported() -> str:
    return ", ".join(f"{s.pipeline_class} ({s.name})" for s in FAMILIES.values())


__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "FamilySpec",
    "check_pipeline_family",
    "family_for_pipeline",
    "family_names",
    "find_family_for_pipeline",
    "get_family",
    "reference_family_names",
]
