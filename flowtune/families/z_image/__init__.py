"""Z-Image (``model.family: z-image``): its registry entry, :data:`SPEC`.

Alibaba Tongyi's Z-Image: a 6B single-stream transformer over image and Qwen3-4B caption tokens,
the FLUX.1 VAE.  One family for Z-Image-Turbo (distilled: ~8 steps without classifier-free
guidance) and the base Z-Image (classifier-free guidance against a negative prompt).  The
family's code: :mod:`.adapter` (``ZImageAdapter``), :mod:`.encoder` (``ZImageEncoder``),
:mod:`.naming` (``Z_IMAGE_NAMING``: the names of kohya / ComfyUI export), :mod:`.quantize`, :mod:`.tiny`
(``build_tiny_z_image``).
"""

from __future__ import annotations

from flowtune.families.spec import FamilySpec
from flowtune.families.z_image.quantize import ENCODER_QUANTIZE_SKIP, QUANTIZE_SKIP

# Every block's attention projections and SwiGLU feed-forward, in the main layers and in the
# noise (image) and context (caption) refiners alike, as ai-toolkit and musubi-tuner train them.
LORA_TARGETS = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)

# Forward order: the image tokens' refiner blocks, the caption's, then the joint blocks.
BLOCK_LISTS = (
    ("noise_refiner", "n_refiner_layers"),
    ("context_refiner", "n_refiner_layers"),
    ("layers", "n_layers"),
)

SPEC = FamilySpec(
    name="z-image",
    description="Z-Image (Turbo and base): single-stream 6B transformer, Qwen3-4B text encoder, FLUX.1 VAE; "
    "text-to-image",
    adapter="z_image",
    adapter_class="flowtune.families.z_image.adapter:ZImageAdapter",
    pipeline_class="ZImagePipeline",
    transformer_class="ZImageTransformer2DModel",
    lora_target_modules=LORA_TARGETS,
    # ZImagePipeline needs sides that are multiples of vae_scale_factor * 2 (the 2x2 patch).
    spatial_granularity=16,
    tiny_builder="flowtune.families.z_image.tiny:build_tiny_z_image",
    encoder="flowtune.families.z_image.encoder:ZImageEncoder",
    lora_original_names="flowtune.families.z_image.naming:Z_IMAGE_NAMING",
    block_lists=BLOCK_LISTS,
    quantize_skip=QUANTIZE_SKIP,
    encoder_quantize_skip=ENCODER_QUANTIZE_SKIP,
    # The base model shares Z-Image-Turbo's text encoder and VAE.
    component_sources=(("Tongyi-MAI/Z-Image", "Tongyi-MAI/Z-Image-Turbo"),),
    # ZImagePipeline's classifier-free guidance, pos + guidance_scale * (pos - neg), runs when
    # guidance_scale > 0.  The default is the base model's: 4 against the empty negative prompt
    # (the pipeline's own default negative); Z-Image-Turbo recipes set validation.guidance: 0.
    guidance_argument="guidance_scale",
    adapter_arguments=(),  # ZImageAdapter takes none
    guidance=4.0,
    negative_prompt="",
)
