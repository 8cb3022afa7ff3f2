"""Wan 2.1 / 2.2 (``model.family: wan``): its registry entry, :data:`SPEC`.

Alibaba's Wan: a DiT over 1x2x2 patches of a causal 3D VAE's latents, cross-attending to UMT5-XXL
caption embeddings zero-padded to 512 tokens; classifier-free guidance against a negative prompt.
Still images train as one-frame clips.  The checkpoints it serves:

- Wan 2.1 T2V (1.3B, 14B): ``WanPipeline``, 16-channel VAE (8x spatial, 4x temporal).
- Wan 2.1 I2V 14B (480P, 720P): ``WanImageToVideoPipeline``; the transformer takes the noisy
  latents, a 4-channel first-frame mask and the VAE encoding of [first frame, zeros] (cached as
  ``condition_latents``), and CLIP image embeddings (cached as ``image_embeds``).
- Wan 2.2 TI2V-5B: 48-channel VAE (16x spatial), ``expand_timesteps``: per-token timesteps, the
  clean first latent frame for image-to-video (left out of the loss).
- Wan 2.2 T2V-A14B: two experts (``transformer``, ``transformer_2``) split at ``boundary_ratio``;
  ``model.expert`` trains one LoRA per expert (:mod:`flowtune.experts`).

The family's code: :mod:`.adapter` (``WanAdapter``), :mod:`.encoder` (``WanEncoder``),
:mod:`.naming` (``WAN_NAMING``: Wan's original module names for kohya / ComfyUI export),
:mod:`.quantize`, :mod:`.tiny` (``build_tiny_wan``, ``build_tiny_wan_i2v``,
``build_tiny_wan_ti2v``), :mod:`.tiny_a14b` (``build_tiny_wan22_a14b``).
"""

from __future__ import annotations

from flowtune.families.spec import FamilySpec
from flowtune.families.wan.quantize import ENCODER_QUANTIZE_SKIP, QUANTIZE_SKIP

# Every block's self-attention (attn1) and text cross-attention (attn2) projections and its
# feed-forward, as musubi-tuner and diffusers' Wan LoRAs train them; the modulation is a
# parameter table (scale_shift_table), not a layer.
LORA_TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
)

# 30 (1.3B) or 40 (14B) blocks, nothing else.
BLOCK_LISTS = (("blocks", "num_layers"),)

SPEC = FamilySpec(
    name="wan",
    description="Wan 2.1 T2V (1.3B, 14B) and I2V (14B), Wan 2.2 TI2V-5B and T2V-A14B (two experts): "
    "UMT5-XXL text encoder, causal 3D VAE (4x temporal), classifier-free guidance",
    adapter="wan",
    adapter_class="flowtune.families.wan.adapter:WanAdapter",
    pipeline_class="WanPipeline",
    transformer_class="WanTransformer3DModel",
    lora_target_modules=LORA_TARGETS,
    # WanPipeline rounds sides down to multiples of vae_scale_factor_spatial x patch (8 x 2).
    spatial_granularity=16,
    tiny_builder="flowtune.families.wan.tiny:build_tiny_wan",
    tiny_variants=(
        ("i2v", "flowtune.families.wan.tiny:build_tiny_wan_i2v"),  # Wan 2.1 I2V
        ("ti2v", "flowtune.families.wan.tiny:build_tiny_wan_ti2v"),  # Wan 2.2 TI2V-5B
        ("a14b", "flowtune.families.wan.tiny_a14b:build_tiny_wan22_a14b"),  # Wan 2.2 T2V-A14B
    ),
    # Wan 2.1 I2V checkpoints (noisy, mask and condition channels, CLIP image tokens); Wan 2.2
    # TI2V-5B is saved as WanPipeline (expand_timesteps).  Their clips start from a given first
    # frame (sample --image, validation.images): flowtune.families.wan.encoder.
    other_pipeline_classes=("WanImageToVideoPipeline",),
    first_frame_images=True,
    encoder="flowtune.families.wan.encoder:WanEncoder",
    lora_original_names="flowtune.families.wan.naming:WAN_NAMING",
    block_lists=BLOCK_LISTS,
    quantize_skip=QUANTIZE_SKIP,
    encoder_quantize_skip=ENCODER_QUANTIZE_SKIP,
    # The 14B models (T2V, I2V, Wan 2.2 A14B's two experts) have the 1.3B's text encoder and VAE
    # (the I2V's CLIP image encoder is not sized); Wan 2.2 TI2V-5B's own are bundled (its VAE is
    # Wan 2.2's).
    component_sources=(
        ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
        ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
        ("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
        # Wan 2.2 A14B (two experts, model.expert): the same UMT5-XXL and 16-channel VAE.
        ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    ),
    adapter_arguments=(),  # WanAdapter takes none
    # WanPipeline's classifier-free guidance, uncond + guidance_scale * (cond - uncond), runs when
    # guidance_scale > 1 (its default 5.0).  Given no negative prompt, its encode_prompt encodes
    # "" (``negative_prompt or ""``): the family's default negative prompt is that empty one.
    guidance_argument="guidance_scale",
    guidance=5.0,
    negative_prompt="",
    video_vae=True,  # AutoencoderKLWan: an image is a one-frame video
    frame_granularity=4,  # 4n + 1 frames: the VAE keeps the first frame and packs 4 per latent frame
    fps=16,
)
