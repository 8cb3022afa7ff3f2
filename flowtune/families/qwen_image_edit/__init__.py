"""Qwen-Image-Edit-2509 / -2511 (``model.family: qwen-image-edit``): its entry, :data:`SPEC`.

Edit pairs as FLUX.1 Kontext's (``data.control_column``, ``control/`` beside the images): the
adapter (:mod:`.adapter`, ``QwenImageEditAdapter``) appends 1 to 3 references' packed latents to
the target's tokens as ``QwenImageEditPlusPipeline`` does; the encoder (:mod:`.encoder`) caches
the references' latents and the vision-language prompt embeddings, which depend on the
references (``QwenImageEditEncoder.text_uses_references``: preprocess keys and encodes a caption
with its item's references; validation encodes its prompts with ``validation.images``).
Everything else is Qwen-Image's (:mod:`flowtune.families.qwen_image`): LoRA targets, naming,
quantization choices, block lists.
"""

from __future__ import annotations

from flowtune.families.qwen_image import ADAPTER_ARGUMENTS, BLOCK_LISTS, LORA_TARGETS
from flowtune.families.qwen_image.quantize import QUANTIZE_SKIP
from flowtune.families.spec import FamilySpec

SPEC = FamilySpec(
    name="qwen-image-edit",
    description="Qwen-Image-Edit-2509/2511: Qwen-Image that edits 1 to 3 reference images per an instruction",
    adapter="qwen_image_edit",
    adapter_class="flowtune.families.qwen_image_edit.adapter:QwenImageEditAdapter",
    pipeline_class="QwenImageEditPlusPipeline",
    transformer_class="QwenImageTransformer2DModel",
    lora_target_modules=LORA_TARGETS,
    spatial_granularity=16,
    tiny_builder="flowtune.families.qwen_image_edit.tiny:build_tiny_qwen_image_edit",
    encoder="flowtune.families.qwen_image_edit.encoder:QwenImageEditEncoder",
    lora_original_names="flowtune.families.qwen_image.naming:QWEN_IMAGE_NAMING",
    reference_images=True,
    block_lists=BLOCK_LISTS,
    quantize_skip=QUANTIZE_SKIP,
    # All of Qwen2.5-VL that encoding keeps, its vision tower included (the edit pipeline runs it
    # on the references); its output head is dropped as it loads (QwenImageEditEncoder).
    encoder_quantize_skip=(("text_encoder", ()),),
    adapter_arguments=ADAPTER_ARGUMENTS,
    guidance_argument="true_cfg_scale",
    guidance=4.0,
    negative_prompt=" ",
    video_vae=True,
    # The Hub's Qwen-Image-Edit-2511 ships Qwen-Image's text encoder and VAE.
    component_sources=(("Qwen/Qwen-Image-Edit-2511", "Qwen/Qwen-Image"),),
)
