"""FLUX.2 [dev] (``model.family: flux2``): its registry entry, :data:`SPEC`.

The family's code: :mod:`.adapter` (``Flux2Adapter``), :mod:`.encoder` (``Flux2Encoder``),
:mod:`.naming` (``FLUX2_NAMING``, BFL names for kohya / ComfyUI export), :mod:`.quantize`,
:mod:`.lean` (``patch_transformer``: a feed-forward activation with a leaner backward),
:mod:`.tiny` (``build_tiny_flux2``).
"""

from __future__ import annotations

from flowtune.families.flux import ADAPTER_ARGUMENTS, ATTENTION_TARGETS, BLOCK_LISTS
from flowtune.families.flux2.quantize import ENCODER_QUANTIZE_SKIP, QUANTIZE_SKIP
from flowtune.families.spec import FamilySpec

# The double-stream blocks' attention projections and feed-forward layers, and the single-stream
# blocks' fused qkv + MLP input projection and their output projection (a bare "attn.to_out" would
# also hit the double-stream blocks' to_out ModuleList).
LORA_TARGETS = (
    *ATTENTION_TARGETS,
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
    "single_transformer_blocks.*.attn.to_out",
)

# As FLUX.1 (BLOCK_LISTS): the double-stream blocks run first, then the single-stream blocks.

SPEC = FamilySpec(
    name="flux2",
    description="FLUX.2 [dev]: Mistral3 text encoder, 32-channel VAE with BN-normalized 2x2-patchified latents, "
    "4D RoPE ids; text-to-image and editing with reference images",
    adapter="flux2",
    adapter_class="flowtune.families.flux2.adapter:Flux2Adapter",
    pipeline_class="Flux2Pipeline",
    transformer_class="Flux2Transformer2DModel",
    lora_target_modules=LORA_TARGETS,
    spatial_granularity=16,
    tiny_builder="flowtune.families.flux2.tiny:build_tiny_flux2",
    encoder="flowtune.families.flux2.encoder:Flux2Encoder",
    lora_original_names="flowtune.families.flux2.naming:FLUX2_NAMING",
    block_lists=BLOCK_LISTS,
    reference_images=True,
    references_optional=True,
    quantize_skip=QUANTIZE_SKIP,
    encoder_quantize_skip=ENCODER_QUANTIZE_SKIP,
    adapter_arguments=ADAPTER_ARGUMENTS,
    guidance=4.0,  # Flux2Pipeline's default guidance_scale
    transformer_patch="flowtune.families.flux2.lean:patch_transformer",
)
