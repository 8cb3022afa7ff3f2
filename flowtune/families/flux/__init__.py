"""FLUX.1 [dev]/[schnell] (``model.family: flux``): its registry entry, :data:`SPEC`.

The family's code: :mod:`.adapter` (``FluxAdapter``), :mod:`.encoder` (``FluxEncoder``),
:mod:`.naming` (``FLUX1_NAMING``, BFL names for kohya / ComfyUI export), :mod:`.quantize`,
:mod:`.tiny` (``build_tiny_flux``).  FLUX.1 Kontext (:mod:`flowtune.families.flux_kontext`) builds
on all of them.
"""

from __future__ import annotations

from flowtune.families.flux.quantize import ENCODER_QUANTIZE_SKIP, QUANTIZE_SKIP
from flowtune.families.spec import FamilySpec

# Attention projections of the double-stream (image + text) and single-stream blocks and the
# feed-forward layers of the double-stream blocks (diffusers' FLUX.1 LoRA naming); FLUX.1 Kontext
# has the same transformer.
# The double-stream blocks' attention projections, image and text (FLUX.2's too).
ATTENTION_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
LORA_TARGETS = (
    *ATTENTION_TARGETS,
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    # The single-stream blocks' output projection; a bare "proj_out" would also hit the
    # transformer's final output layer.
    "single_transformer_blocks.*.proj_out",
)

# The double-stream blocks run first, then the single-stream blocks.
BLOCK_LISTS = (
    ("transformer_blocks", "num_layers"),
    ("single_transformer_blocks", "num_single_layers"),
)

# FluxAdapter's (and FluxKontextAdapter's and Flux2Adapter's) constructor arguments.
ADAPTER_ARGUMENTS = (("guidance_scale", "float"), ("use_guidance_embeds", "bool"))

SPEC = FamilySpec(
    name="flux",
    description="FLUX.1 [dev]/[schnell]: T5 + CLIP text encoders, 16-channel VAE, 2x2 packed latents",
    adapter="flux",
    adapter_class="flowtune.families.flux.adapter:FluxAdapter",
    pipeline_class="FluxPipeline",
    transformer_class="FluxTransformer2DModel",
    lora_target_modules=LORA_TARGETS,
    spatial_granularity=16,
    tiny_builder="flowtune.families.flux.tiny:build_tiny_flux",
    encoder="flowtune.families.flux.encoder:FluxEncoder",
    lora_original_names="flowtune.families.flux.naming:FLUX1_NAMING",
    block_lists=BLOCK_LISTS,
    quantize_skip=QUANTIZE_SKIP,
    encoder_quantize_skip=ENCODER_QUANTIZE_SKIP,
    adapter_arguments=ADAPTER_ARGUMENTS,
)
