"""Qwen-Image's LoRA module names in kohya / ComfyUI files: diffusers' own.

Qwen-Image was released in diffusers' layout, and the tools that read its LoRAs keep those module
names: ComfyUI's Qwen-Image model (``comfy/ldm/qwen_image``) names its layers as diffusers does
and maps ``diffusion_model.<name>`` (and ``transformer.<name>``) LoRA keys onto them, musubi-tuner
writes ``lora_unet_<name with underscores>`` keys, and diffusers' Qwen-Image loader converts both
back (``_convert_non_diffusers_qwen_lora_to_diffusers``).  No layer is fused, so every diffusers
module is its own original module.
"""

from __future__ import annotations

from flowtune.interop.naming import OriginalNaming, OriginalSlot


def qwen_image_slot(module: str) -> OriginalSlot:
    """The original module of the diffusers ``module`` (a ``QwenImageTransformer2DModel`` module
    name, e.g. ``"transformer_blocks.0.attn.to_q"``): the same module."""
    return OriginalSlot(name=module, parts=(module,))


QWEN_IMAGE_NAMING = OriginalNaming(
    description="Qwen-Image (diffusers names)",
    slot=qwen_image_slot,
    kohya_network_module="networks.lora_qwen_image",  # musubi-tuner's Qwen-Image LoRA module
    kohya_base_model_version="qwen_image",
)
