"""Wan 2.1 (T2V, I2V): diffusers module names -> Wan's original module names.

Wan's original layout (the ``Wan-AI/Wan2.1-T2V-*`` ``.pth``/``.safetensors`` checkpoints and
ComfyUI's ``comfy/ldm/wan``) is what ComfyUI maps ``diffusion_model.<name>`` LoRA keys onto and
musubi-tuner names its ``lora_unet_<name, dots as underscores>`` keys after.  It is the inverse of
diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers`` (and ``_convert_musubi_wan_lora_to_
diffusers``) in ``diffusers/loaders/lora_conversion_utils.py``.  No layer is fused:

==========================================================  ======================================
diffusers (``WanTransformer3DModel``)                       Wan
==========================================================  ======================================
``blocks.{i}.attn1.to_q | to_k | to_v | to_out.0``          ``blocks.{i}.self_attn.q | k | v | o``
``blocks.{i}.attn2.to_q | to_k | to_v | to_out.0``          ``blocks.{i}.cross_attn.q | k | v | o``
``blocks.{i}.attn2.add_k_proj | add_v_proj`` (I2V)          ``blocks.{i}.cross_attn.k_img | v_img``
``blocks.{i}.ffn.net.0.proj | ffn.net.2``                   ``blocks.{i}.ffn.0 | ffn.2``
``condition_embedder.text_embedder.linear_1 | linear_2``    ``text_embedding.0 | .2``
``condition_embedder.time_embedder.linear_1 | linear_2``    ``time_embedding.0 | .2``
``condition_embedder.time_proj``                            ``time_projection.1``
``proj_out``                                                ``head.head``
==========================================================  ======================================
"""

from __future__ import annotations

import re

from flowtune.interop.naming import OriginalNaming, OriginalSlot

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_IN_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    # Wan 2.1 I2V's projections of the CLIP image tokens in the cross-attention.
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_TOP_LEVEL = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
}


def wan_slot(module: str) -> OriginalSlot | None:
    """The original module of the diffusers ``module`` (a ``WanTransformer3DModel`` module name,
    e.g. ``"blocks.0.attn1.to_q"`` -> ``"blocks.0.self_attn.q"``); None for a module the table
    does not name."""
    match = _BLOCK.match(module)
    if match:
        index, suffix = match.groups()
        original = _IN_BLOCK.get(suffix)
        return OriginalSlot(name=f"blocks.{index}.{original}", parts=(module,)) if original else None
    if module in _TOP_LEVEL:
        return OriginalSlot(name=_TOP_LEVEL[module], parts=(module,))
    return None


WAN_NAMING = OriginalNaming(
    description="Wan 2.1 (Wan's original names)",
    slot=wan_slot,
    kohya_network_module="networks.lora_wan",  # musubi-tuner's Wan LoRA module
    kohya_base_model_version="wan",
)
