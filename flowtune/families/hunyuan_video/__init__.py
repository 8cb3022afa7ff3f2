"""HunyuanVideo 1.5 (``model.family: hunyuan-video``): its registry entry, :data:`SPEC`.

The family's code: :mod:`.adapter` (``HunyuanVideoAdapter``), :mod:`.encoder`
(``HunyuanVideoEncoder``), :mod:`.naming` (``HUNYUAN_VIDEO_NAMING``: musubi-tuner's and
ComfyUI's original key names), :mod:`.plan` (``traceable_forward``: the transformer forward that
``flowtune plan`` traces), :mod:`.attention` (``patch_transformer``: the blocks' attention with
a key mask instead of diffusers' dense one), :mod:`.quantize`, :mod:`.tiny`
(``build_tiny_hunyuan_video``).
"""

from __future__ import annotations

from flowtune.families.hunyuan_video.quantize import ENCODER_QUANTIZE_SKIP, QUANTIZE_SKIP
from flowtune.families.spec import GUIDER, FamilySpec

# The attention projections of both streams (video: to_q/k/v/out, text: add_*_proj/to_add_out)
# and both streams' feed-forward layers, in the 54 double-stream blocks only (the text token
# refiner has modules of the same names); the per-block modulation layers (norm1.linear,
# norm1_context.linear) are left out as in the other families' targets.
LORA_TARGETS = tuple(
    f"transformer_blocks.*.{name}"
    for name in (
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
    )
)

# 54 double-stream blocks (video and text streams side by side), nothing else.
BLOCK_LISTS = (("transformer_blocks", "num_layers"),)

# The Hub's diffusers-format HunyuanVideo 1.5 models (hunyuanvideo-community) whose bundled configs
# flowtune plan reads: 480p and 720p, text-to-video and image-to-video, all with the same text
# encoders (Qwen2.5-VL-7B's text model, ByT5 Glyph-SDXL-v2) as the 480p text-to-video one.
HUB = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-"
COMPONENT_SOURCES = tuple((HUB + name, HUB + "480p_t2v") for name in ("720p_t2v", "480p_i2v", "720p_i2v"))

# HunyuanVideoAdapter's constructor arguments (FamilySpec.adapter_arguments).
ADAPTER_ARGUMENTS = (("use_condition_latents", "bool"),)

SPEC = FamilySpec(
    name="hunyuan-video",
    description="HunyuanVideo 1.5: Qwen2.5-VL and ByT5 text encoders, 32-channel causal video VAE "
    "(16x space, 4x time), condition latents and mask channel for image-to-video, "
    "classifier-free guidance",
    adapter="hunyuan_video",
    adapter_class="flowtune.families.hunyuan_video.adapter:HunyuanVideoAdapter",
    pipeline_class="HunyuanVideo15Pipeline",
    transformer_class="HunyuanVideo15Transformer3DModel",
    lora_target_modules=LORA_TARGETS,
    spatial_granularity=16,
    tiny_builder="flowtune.families.hunyuan_video.tiny:build_tiny_hunyuan_video",
    tiny_variants=(("i2v", "flowtune.families.hunyuan_video.tiny:build_tiny_hunyuan_video_i2v"),),
    encoder="flowtune.families.hunyuan_video.encoder:HunyuanVideoEncoder",
    lora_original_names="flowtune.families.hunyuan_video.naming:HUNYUAN_VIDEO_NAMING",
    # HunyuanVideo15Pipeline has no LoRA loader mixin in diffusers 0.42: its LoRA files are
    # written in the transformer-only layout of HunyuanVideo (1.0)'s mixin ("transformer." keys,
    # peft metadata), which its transformer's load_lora_adapter(..., prefix="transformer") reads.
    lora_loader="diffusers.loaders.lora_pipeline:HunyuanVideoLoraLoaderMixin",
    # The image-to-video checkpoints: the same transformer and VAE, plus a SigLIP image encoder
    # (whose embeddings of a clip's first frame preprocess caches as image_embeds).
    other_pipeline_classes=("HunyuanVideo15ImageToVideoPipeline",),
    # Their clips start from a given first frame (sample --image, validation.images).
    first_frame_images=True,
    block_lists=BLOCK_LISTS,
    quantize_skip=QUANTIZE_SKIP,
    encoder_quantize_skip=ENCODER_QUANTIZE_SKIP,
    component_sources=COMPONENT_SOURCES,
    adapter_arguments=ADAPTER_ARGUMENTS,
    # The pipelines sample with classifier-free guidance through their guider component
    # (ClassifierFreeGuidance, guidance_scale 6.0 in the hub models' guider/config.json; 1.0 in
    # the distilled ones); __call__ takes no guidance argument: sampling sets the guider's.
    guidance_argument=GUIDER,
    guidance=6.0,
    # The pipelines' negative prompt when given none: "" (encoded as the user turn " ", no glyph
    # text).
    negative_prompt="",
    video_vae=True,  # AutoencoderKLHunyuanVideo15: an image is a one-frame video
    frame_granularity=4,
    fps=24,  # the image-to-video example exports at 24 fps; the models are trained at 24
    # diffusers' forward branches on its image embeddings and reorders text tokens by their
    # masks: flowtune plan traces a stand-in of the same shapes.
    plan_forward="flowtune.families.hunyuan_video.plan:traceable_forward",
    transformer_patch="flowtune.families.hunyuan_video.attention:patch_transformer",
)
