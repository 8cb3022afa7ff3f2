"""The model-family registry: everything model-specific that shared code needs to know.

Shared code (recipes, the data cache, the trainer, sampling) never branches on a family name;
it looks the family up here.  Adding a family means one adapter file and one entry below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from flowtune.errors import FlowtuneError


@dataclass(frozen=True)
class FamilySpec:
    """How flowtune handles one model family.

    Attributes:
        name: The recipe's ``model.family`` value, e.g. ``"flux"``.
        description: One line for ``flowtune`` listings.
        adapter: The :func:`flowtune.flow_matching.create_adapter` name of its adapter.
        pipeline_class: The diffusers inference pipeline class (``diffusers.<name>``); a model
            folder of this family names it as ``_class_name`` in its ``model_index.json``.
        transformer_class: The diffusers denoiser class, loaded from subfolder ``transformer``.
        lora_target_modules: Default LoRA targets when ``lora.target_modules`` is not set in the
            recipe: peft suffix names, or ``*`` patterns over full module names.
        spatial_granularity: Image sides (pixels) must be multiples of this.
        tiny_builder: ``"module:function"`` writing an offline tiny random pipeline in diffusers
            format; called as ``fn(out_dir: Path, seed: int) -> None``.
        encoder: ``"module:Class"`` of the family's :class:`flowtune.encoders.FamilyEncoder`,
            which ``flowtune preprocess`` uses to turn images and captions into cached tensors.
        lora_original_names: ``"module:attribute"`` of the family's
            :class:`flowtune.interop.naming.OriginalNaming`: how its diffusers LoRA modules are
            named (and fused) in the original checkpoint layout that kohya sd-scripts and ComfyUI
            use (``flowtune export --format kohya|comfyui``).  None: the family has no such export.
        reference_images: The family can condition on reference (control) images besides the
            caption (image editing: FLUX.1 Kontext, FLUX.2): datasets can be edit pairs,
            preprocess then caches the references' latents, and sampling takes ``--image``.
        references_optional: The family also generates from the caption alone (FLUX.2), so
            plain image datasets and sampling without ``--image`` work too; otherwise (FLUX.1
            Kontext) every example and every sample needs its reference.
        other_pipeline_classes: Further ``model_index.json`` ``_class_name`` values of model
            folders that hold this family's model (checkpoints saved by another pipeline class
            with the same components).
        block_lists: The transformer's block ``ModuleList`` attributes, in forward order, each
            with the ``config.json`` key of its length, e.g. ``(("transformer_blocks",
            "num_layers"), ...)``: what ``train.block_offload`` streams, and how many blocks a
            model has before it is loaded.  Empty: the family has no block offload.
        quantize_skip: Linear layers of the transformer that ``model.quantize`` keeps in
            ``model.dtype``: full module names or ``*`` globs over them, a match covering the
            module's children (:func:`flowtune.memory.quantize.matches_any`).  Typically the
            embedders and the final norm and projection: small, and sensitive to rounding.
        encoder_quantize_skip: The text encoders that ``model.encoder_quantize`` quantizes, as
            ``(pipeline component, patterns)`` pairs: the component's linear layers but those the
            patterns name (as in ``quantize_skip``) are quantized.  Components not listed (e.g. a
            small CLIP) stay in ``model.dtype``.  Empty: the family's encoders are never quantized.
    """

    name: str
    description: str
    adapter: str
    pipeline_class: str
    transformer_class: str
    lora_target_modules: tuple[str, ...]
    spatial_granularity: int
    tiny_builder: str
    encoder: str
    lora_original_names: str | None = None
    reference_images: bool = False
    references_optional: bool = False
    other_pipeline_classes: tuple[str, ...] = ()
    block_lists: tuple[tuple[str, str], ...] = ()
    quantize_skip: tuple[str, ...] = ()
    encoder_quantize_skip: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def pipeline_classes(self) -> tuple[str, ...]:
        """Every ``model_index.json`` ``_class_name`` of a model folder of this family."""
        return (self.pipeline_class, *self.other_pipeline_classes)

    def uses_edit_pairs(self, edit_pairs: bool | None) -> bool:
        """Whether a recipe trains on edit pairs, given its ``data.edit_pairs`` (None = the
        family's default: edit pairs when it cannot do without references)."""
        if edit_pairs is None:
            return self.reference_images and not self.references_optional
        return edit_pairs

    def load_tiny_builder(self) -> Callable[..., Any]:
        """Import and return the tiny-pipeline builder function."""
        return _import_object(self.tiny_builder)

    def load_encoder_class(self) -> type:
        """Import and return the family's encoder class (a ``FamilyEncoder`` subclass)."""
        return _import_object(self.encoder)

    def load_lora_original_names(self) -> Any | None:
        """Import and return the family's ``OriginalNaming`` (None if it has none)."""
        return _import_object(self.lora_original_names) if self.lora_original_names else None


def _import_object(reference: str) -> Any:
    """The object named by ``"package.module:attribute"``."""
    module, _, attr = reference.partition(":")
    return getattr(import_module(module), attr)


# Attention projections of the double-stream (image + text) and single-stream blocks and the
# feed-forward layers of the double-stream blocks (diffusers' FLUX.1 LoRA naming); FLUX.1 Kontext
# has the same transformer.
_FLUX1_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    # The single-stream blocks' output projection; a bare "proj_out" would also hit the
    # transformer's final output layer.
    "single_transformer_blocks.*.proj_out",
)


# Kept in model.dtype under model.quantize: the timestep/guidance/pooled-text embedders, the image
# and text input projections, and the output norm and projection (under 1% of FLUX.1's weights).
# The per-block modulation layers (norm1.linear, ...: 2.1B of 12B weights) are quantized.
_FLUX1_QUANTIZE_SKIP = ("time_text_embed", "x_embedder", "context_embedder", "norm_out", "proj_out")


# FLUX.2's transformer: the double-stream blocks' attention projections and feed-forward layers,
# and the single-stream blocks' fused qkv + MLP input projection and their output projection (a
# bare "attn.to_out" would also hit the double-stream blocks' to_out ModuleList).
_FLUX2_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
    "single_transformer_blocks.*.attn.to_out",
)


# FLUX.2 keeps, besides the embedders and the output layers, its three modulation layers: shared
# by every block (one error reaches all of them), and under 2% of the weights.
_FLUX2_QUANTIZE_SKIP = (
    "time_guidance_embed",
    "double_stream_modulation_img",
    "double_stream_modulation_txt",
    "single_stream_modulation",
    "x_embedder",
    "context_embedder",
    "norm_out",
    "proj_out",
)


# model.encoder_quantize: FLUX.1 quantizes T5 (text_encoder_2; 4.7B weights, all its linear layers:
# T5EncoderModel has no output head, and its embedding and norms are not linear layers) and keeps
# CLIP-L (text_encoder, 0.12B) as loaded.
_FLUX1_ENCODER_QUANTIZE_SKIP = (("text_encoder_2", ()),)

# FLUX.2 quantizes Mistral3 (text_encoder) but its Pixtral vision tower and projector, which text
# prompts never run (quantizing them would only slow the load).
_FLUX2_ENCODER_QUANTIZE_SKIP = (("text_encoder", ("model.vision_tower", "model.multi_modal_projector")),)


# FLUX.1 and FLUX.2: the double-stream blocks run first, then the single-stream blocks.
_DOUBLE_AND_SINGLE_BLOCKS = (
    ("transformer_blocks", "num_layers"),
    ("single_transformer_blocks", "num_single_layers"),
)


FAMILIES: dict[str, FamilySpec] = {
    "flux": FamilySpec(
        name="flux",
        description="FLUX.1 [dev]/[schnell]: T5 + CLIP text encoders, 16-channel VAE, 2x2 packed latents",
        adapter="flux",
        pipeline_class="FluxPipeline",
        transformer_class="FluxTransformer2DModel",
        lora_target_modules=_FLUX1_LORA_TARGETS,
        spatial_granularity=16,
        tiny_builder="flowtune.tiny:build_tiny_flux",
        encoder="flowtune.encoders.flux:FluxEncoder",
        lora_original_names="flowtune.interop.flux:FLUX1_NAMING",
        block_lists=_DOUBLE_AND_SINGLE_BLOCKS,
        quantize_skip=_FLUX1_QUANTIZE_SKIP,
        encoder_quantize_skip=_FLUX1_ENCODER_QUANTIZE_SKIP,
    ),
    "flux-kontext": FamilySpec(
        name="flux-kontext",
        description="FLUX.1 Kontext [dev]: FLUX.1 that edits reference images per an instruction",
        adapter="flux_kontext",
        pipeline_class="FluxKontextPipeline",
        transformer_class="FluxTransformer2DModel",
        lora_target_modules=_FLUX1_LORA_TARGETS,
        spatial_granularity=16,
        tiny_builder="flowtune.tiny:build_tiny_flux_kontext",
        encoder="flowtune.encoders.flux_kontext:FluxKontextEncoder",
        lora_original_names="flowtune.interop.flux:FLUX1_NAMING",
        block_lists=_DOUBLE_AND_SINGLE_BLOCKS,
        reference_images=True,
        quantize_skip=_FLUX1_QUANTIZE_SKIP,
        encoder_quantize_skip=_FLUX1_ENCODER_QUANTIZE_SKIP,
    ),
    "flux2": FamilySpec(
        name="flux2",
        description="FLUX.2 [dev]: Mistral3 text encoder, 32-channel VAE with BN-normalized 2x2-patchified latents, "
        "4D RoPE ids; text-to-image and editing with reference images",
        adapter="flux2",
        pipeline_class="Flux2Pipeline",
        transformer_class="Flux2Transformer2DModel",
        lora_target_modules=_FLUX2_LORA_TARGETS,
        spatial_granularity=16,
        tiny_builder="flowtune.tiny:build_tiny_flux2",
        encoder="flowtune.encoders.flux2:Flux2Encoder",
        lora_original_names="flowtune.interop.flux2:FLUX2_NAMING",
        block_lists=_DOUBLE_AND_SINGLE_BLOCKS,
        reference_images=True,
        references_optional=True,
        quantize_skip=_FLUX2_QUANTIZE_SKIP,
        encoder_quantize_skip=_FLUX2_ENCODER_QUANTIZE_SKIP,
    ),
}


def family_names() -> list[str]:
    """The registered family names, in registration order."""
    return list(FAMILIES)


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
