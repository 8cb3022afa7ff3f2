"""FLUX.1 Kontext [dev] (``model.family: flux-kontext``): its registry entry, :data:`SPEC`.

FLUX.1 with reference images: the same transformer, text encoders, VAE, LoRA targets, naming
tables and quantization choices as :mod:`flowtune.families.flux`; its own :mod:`.adapter`
(``FluxKontextAdapter``), :mod:`.encoder` (``FluxKontextEncoder``) and :mod:`.tiny`
(``build_tiny_flux_kontext``).
"""

from __future__ import annotations

from flowtune.families.flux import ADAPTER_ARGUMENTS, BLOCK_LISTS, LORA_TARGETS
from flowtune.families.flux.quantize import ENCODER_QUANTIZE_SKIP, QUANTIZE_SKIP
from flowtune.families.spec import FamilySpec

SPEC = FamilySpec(
    name="flux-kontext",
    description="FLUX.1 Kontext [dev]: FLUX.1 that edits reference images per an instruction",
    adapter="flux_kontext",
    adapter_class="flowtune.families.flux_kontext.adapter:FluxKontextAdapter",
    pipeline_class="FluxKontextPipeline",
    transformer_class="FluxTransformer2DModel",
    lora_target_modules=LORA_TARGETS,
    spatial_granularity=16,
    tiny_builder="flowtune.families.flux_kontext.tiny:build_tiny_flux_kontext",
    encoder="flowtune.families.flux_kontext.encoder:FluxKontextEncoder",
    lora_original_names="flowtune.families.flux.naming:FLUX1_NAMING",
    block_lists=BLOCK_LISTS,
    reference_images=True,
    quantize_skip=QUANTIZE_SKIP,
    encoder_quantize_skip=ENCODER_QUANTIZE_SKIP,
    adapter_arguments=ADAPTER_ARGUMENTS,
    # The Hub's Kontext shares FLUX.1 [dev]'s text encoders and VAE.
    component_sources=(("black-forest-labs/FLUX.1-Kontext-dev", "black-forest-labs/FLUX.1-dev"),),
)
