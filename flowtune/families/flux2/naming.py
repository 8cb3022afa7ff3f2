"""FLUX.2: diffusers module names -> the original Black Forest Labs (BFL) module names.

The BFL layout is what FLUX.2 checkpoints ship as (``flux2-dev.safetensors``) and what kohya
(musubi-tuner), ai-toolkit and ComfyUI name LoRA modules after.  It is the inverse of diffusers'
FLUX.2 converters: ``convert_flux2_transformer_checkpoint_to_diffusers``
(``diffusers/loaders/single_file_utils.py``, the full checkpoint) and
``_convert_kohya_flux2_lora_to_diffusers`` / ``_convert_non_diffusers_flux2_lora_to_diffusers``
(``diffusers/loaders/lora_conversion_utils.py``, LoRAs):

===============================================================  =================================
diffusers (``Flux2Transformer2DModel``)                          BFL
===============================================================  =================================
``transformer_blocks.{i}.attn.to_q | to_k | to_v``               ``double_blocks.{i}.img_attn.qkv``
``transformer_blocks.{i}.attn.add_q_proj | _k_ | _v_``           ``double_blocks.{i}.txt_attn.qkv``
``transformer_blocks.{i}.attn.to_out.0``                         ``double_blocks.{i}.img_attn.proj``
``transformer_blocks.{i}.attn.to_add_out``                       ``double_blocks.{i}.txt_attn.proj``
``transformer_blocks.{i}.ff.linear_in | linear_out``             ``double_blocks.{i}.img_mlp.0 | .2``
``transformer_blocks.{i}.ff_context.linear_in | linear_out``     ``double_blocks.{i}.txt_mlp.0 | .2``
``single_transformer_blocks.{i}.attn.to_qkv_mlp_proj``           ``single_blocks.{i}.linear1``
``single_transformer_blocks.{i}.attn.to_out``                    ``single_blocks.{i}.linear2``
``x_embedder`` / ``context_embedder``                            ``img_in`` / ``txt_in``
``time_guidance_embed.timestep_embedder.linear_1 | 2``           ``time_in.in_layer | out_layer``
``time_guidance_embed.guidance_embedder.linear_1 | 2``           ``guidance_in.in_layer | out_layer``
``double_stream_modulation_img.linear``                          ``double_stream_modulation_img.lin``
``double_stream_modulation_txt.linear``                          ``double_stream_modulation_txt.lin``
``single_stream_modulation.linear``                              ``single_stream_modulation.lin``
``proj_out``                                                     ``final_layer.linear``
``norm_out.linear``                                              ``final_layer.adaLN_modulation.1``
===============================================================  =================================

That is every linear layer of the transformer.  Unlike FLUX.1, diffusers keeps a FLUX.2 single
block's fused input projection (``to_qkv_mlp_proj`` = BFL ``linear1``: q, k, v and the SwiGLU
MLP input, stacked by rows) as one module, so only the double blocks' ``qkv`` are fused here:
``[q; k; v]``, 3 x hidden rows.  The modulation layers are shared by all blocks and have the same
row order in both layouts; only the final layer's ``adaLN_modulation`` differs: BFL
``[shift; scale]``, diffusers ``[scale; shift]`` (the checkpoint converter swaps them).

``comfyui`` files use peft's ``lora_A`` / ``lora_B`` names without ``alpha`` tensors, the layout
of ai-toolkit's FLUX.2 LoRAs: ComfyUI reads it, and diffusers' FLUX.2 loader reads
``diffusion_model.`` names only in it (a file with ``lora_down`` keys goes to its kohya
converter, which knows only ``lora_unet_`` names).
"""

from __future__ import annotations

from flowtune.interop.naming import BlockTable, OriginalNaming, OriginalSlot, block_slot

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADDED_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")

# Per block: diffusers suffix -> (BFL suffix, the fused parts in row order, their relative sizes).
_DOUBLE: BlockTable = {
    **{part: ("img_attn.qkv", _QKV, (1, 1, 1)) for part in _QKV},
    **{part: ("txt_attn.qkv", _ADDED_QKV, (1, 1, 1)) for part in _ADDED_QKV},
    "attn.to_out.0": ("img_attn.proj", ("attn.to_out.0",), (1,)),
    "attn.to_add_out": ("txt_attn.proj", ("attn.to_add_out",), (1,)),
    "ff.linear_in": ("img_mlp.0", ("ff.linear_in",), (1,)),
    "ff.linear_out": ("img_mlp.2", ("ff.linear_out",), (1,)),
    "ff_context.linear_in": ("txt_mlp.0", ("ff_context.linear_in",), (1,)),
    "ff_context.linear_out": ("txt_mlp.2", ("ff_context.linear_out",), (1,)),
}
_SINGLE: BlockTable = {
    "attn.to_qkv_mlp_proj": ("linear1", ("attn.to_qkv_mlp_proj",), (1,)),
    "attn.to_out": ("linear2", ("attn.to_out",), (1,)),
}
_TOP_LEVEL: dict[str, str] = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}


def flux2_slot(module: str) -> OriginalSlot | None:
    """The BFL module that the LoRA of the diffusers ``module`` belongs to (see the table above).

    Args:
        module: A module name of ``Flux2Transformer2DModel``, e.g. ``"transformer_blocks.0.attn.to_k"``.

    Returns:
        Its :class:`OriginalSlot`, or None when FLUX.2's original layout has no such module.
    """
    slot = block_slot(module, _DOUBLE, _SINGLE, _TOP_LEVEL)
    if slot is not None:
        return slot
    if module == "norm_out.linear":
        return OriginalSlot(name="final_layer.adaLN_modulation.1", parts=(module,), swap_halves=True)
    return None


FLUX2_NAMING = OriginalNaming(
    description="FLUX.2 (BFL)",
    slot=flux2_slot,
    kohya_network_module="networks.lora_flux_2",
    kohya_base_model_version="flux2",
    comfyui_peft_names=True,
)
