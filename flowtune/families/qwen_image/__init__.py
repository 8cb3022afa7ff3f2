"""Qwen-Image (``model.family: qwen-image``): its registry entry, :data:`SPEC`.

The family's code: :mod:`.adapter` (``QwenImageAdapter``), :mod:`.encoder` (``QwenImageEncoder``),
:mod:`.naming` (``QWEN_IMAGE_NAMING``: kohya / ComfyUI files keep diffusers' names),
:mod:`.quantize`, :mod:`.tiny` (``build_tiny_qwen_image``).
"""

from __future__ import annotations

from flowtune.families.qwen_image.quantize import ENCODER_QUANTIZE_SKIP, QUANTIZE_SKIP
from flowtune.families.spec import FamilySpec

# The attention projections of both streams (image: to_q/k/v/out, text: add_*_proj/to_add_out)
# and both streams' feed-forward layers, in every block; the per-block modulation layers
# (img_mod.1, txt_mod.1) are left out as in FLUX.1's targets.
LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)

# 60 double-stream blocks (image and text streams side by side), nothing else.
BLOCK_LISTS = (("transformer_blocks", "num_layers"),)

# QwenImageAdapter's constructor arguments (FamilySpec.adapter_arguments).
ADAPTER_ARGUMENTS = (("guidance_scale", "float"), ("use_guidance_embeds", "bool"))

SPEC = FamilySpec(
    name="qwen-image",
    description="Qwen-Image: Qwen2.5-VL text encoder, 16-channel video VAE with per-channel latent "
    "statistics, 2x2 packed latents, true classifier-free guidance",
    adapter="qwen_image",
    adapter_class="flowtune.families.qwen_image.adapter:QwenImageAdapter",
    pipeline_class="QwenImagePipeline",
    transformer_class="QwenImageTransformer2DModel",
    lora_target_modules=LORA_TARGETS,
    spatial_granularity=16,
    tiny_builder="flowtune.families.qwen_image.tiny:build_tiny_qwen_image",
    encoder="flowtune.families.qwen_image.encoder:QwenImageEncoder",
    lora_original_names="flowtune.families.qwen_image.naming:QWEN_IMAGE_NAMING",
    block_lists=BLOCK_LISTS,
    quantize_skip=QUANTIZE_SKIP,
    encoder_quantize_skip=ENCODER_QUANTIZE_SKIP,
    # QwenImagePipeline samples with true classifier-free guidance: a second transformer pass on
    # the negative prompt (" " in its examples), true_cfg_scale 4.0.
    adapter_arguments=ADAPTER_ARGUMENTS,
    guidance_argument="true_cfg_scale",
    guidance=4.0,
    negative_prompt=" ",
    video_vae=True,  # AutoencoderKLQwenImage: an image is a one-frame video
)
