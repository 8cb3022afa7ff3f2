"""FLUX.1: diffusers module names -> the original Black Forest Labs (BFL) module names.

The BFL layout is what FLUX.1 checkpoints ship as (``flux1-dev.safetensors``) and what kohya
sd-scripts and ComfyUI name LoRA modules after.  It is the inverse of diffusers'
``_convert_kohya_flux_lora_to_diffusers`` (``diffusers/loaders/lora_conversion_utils.py``):

==========================================================  ======================================
diffusers (``FluxTransformer2DModel``)                      BFL
==========================================================  ======================================
``transformer_blocks.{i}.attn.to_q | to_k | to_v``          ``double_blocks.{i}.img_attn.qkv``
``transformer_blocks.{i}.attn.add_q_proj | _k_ | _v_``      ``double_blocks.{i}.txt_attn.qkv``
``transformer_blocks.{i}.attn.to_out.0``                    ``double_blocks.{i}.img_attn.proj``
``transformer_blocks.{i}.attn.to_add_out``                  ``double_blocks.{i}.txt_attn.proj``
``transformer_blocks.{i}.ff.net.0.proj | ff.net.2``         ``double_blocks.{i}.img_mlp.0 | .2``
``transformer_blocks.{i}.ff_context.net.0.proj | .net.2``   ``double_blocks.{i}.txt_mlp.0 | .2``
``transformer_blocks.{i}.norm1.linear``                     ``double_blocks.{i}.img_mod.lin``
``transformer_blocks.{i}.norm1_context.linear``             ``double_blocks.{i}.txt_mod.lin``
``single_transformer_blocks.{i}.attn.to_q | k | v, proj_mlp``  ``single_blocks.{i}.linear1``
``single_transformer_blocks.{i}.proj_out``                  ``single_blocks.{i}.linear2``
``single_transformer_blocks.{i}.norm.linear``               ``single_blocks.{i}.modulation.lin``
``x_embedder`` / ``context_embedder``                       ``img_in`` / ``txt_in``
``time_text_embed.timestep_embedder.linear_1 | 2``          ``time_in.in_layer | out_layer``
``time_text_embed.guidance_embedder.linear_1 | 2``          ``guidance_in.in_layer | out_layer``
``time_text_embed.text_embedder.linear_1 | 2``              ``vector_in.in_layer | out_layer``
``proj_out``                                                ``final_layer.linear``
``norm_out.linear``                                         ``final_layer.adaLN_modulation.1``
==========================================================  ======================================

Fused modules stack their parts' output rows: ``qkv`` is ``[q; k; v]`` (3 x hidden rows) and
``linear1`` is ``[q; k; v; mlp]`` (hidden, hidden, hidden, 4 x hidden rows).  The modulation
layers of the blocks have the same chunk order (shift, scale, gate) in both layouts; only the
final layer's ``adaLN_modulation`` differs: BFL ``[shift; scale]``, diffusers ``[scale; shift]``.
"""

from __future__ import annotations

from flowtune.interop.naming import BlockTable, OriginalNaming, OriginalSlot, block_slot

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADDED_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
# FLUX.1's MLP is 4 x hidden wide (mlp_ratio 4): linear1's rows are hidden x 3 then 4 x hidden.
_LINEAR1_SIZES = (1, 1, 1, 4)

# Per block: diffusers suffix -> (BFL suffix, the fused parts in row order, their relative sizes).
_DOUBLE: BlockTable = {
    **{part: ("img_attn.qkv", _QKV, (1, 1, 1)) for part in _QKV},
    **{part: ("txt_attn.qkv", _ADDED_QKV, (1, 1, 1)) for part in _ADDED_QKV},
    "attn.to_out.0": ("img_attn.proj", ("attn.to_out.0",), (1,)),
    "attn.to_add_out": ("txt_attn.proj", ("attn.to_add_out",), (1,)),
    "ff.net.0.proj": ("img_mlp.0", ("ff.net.0.proj",), (1,)),
    "ff.net.2": ("img_mlp.2", ("ff.net.2",), (1,)),
    "ff_context.net.0.proj": ("txt_mlp.0", ("ff_context.net.0.proj",), (1,)),
    "ff_context.net.2": ("txt_mlp.2", ("ff_context.net.2",), (1,)),
    "norm1.linear": ("img_mod.lin", ("norm1.linear",), (1,)),
    "norm1_context.linear": ("txt_mod.lin", ("norm1_context.linear",), (1,)),
}
_SINGLE: BlockTable = {
    **{part: ("linear1", _LINEAR1, _LINEAR1_SIZES) for part in _LINEAR1},
    "proj_out": ("linear2", ("proj_out",), (1,)),
    "norm.linear": ("modulation.lin", ("norm.linear",), (1,)),
}
_TOP_LEVEL: dict[str, str] = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
}


def flux1_slot(module: str) -> OriginalSlot | None:
    """The BFL module that the LoRA of the diffusers ``module`` belongs to (see the table above).

    Args:
        module: A module name of ``FluxTransformer2DModel``, e.g. ``"transformer_blocks.0.attn.to_k"``.

    Returns:
        Its :class:`OriginalSlot`, or None when FLUX.1's original layout has no such module.
    """
    slot = block_slot(module, _DOUBLE, _SINGLE, _TOP_LEVEL)
    if slot is not None:
        return slot
    # diffusers' converter reads no alpha for the final layer: the scale goes into lora_up.
    if module == "proj_out":
        return OriginalSlot(name="final_layer.linear", parts=(module,), fold_scale=True)
    if module == "norm_out.linear":
        return OriginalSlot(
            name="final_layer.adaLN_modulation.1", parts=(module,), swap_halves=True, fold_scale=True
        )
    return None


FLUX1_NAMING = OriginalNaming(
    description="FLUX.1 (BFL)",
    slot=flux1_slot,
    kohya_network_module="networks.lora_flux",
    kohya_base_model_version="flux1",
)
