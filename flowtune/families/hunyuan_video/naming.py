"""HunyuanVideo 1.5: diffusers module names -> the original (Tencent) module names, in the two
layouts that other tools read.

diffusers' ``transformer_blocks.{i}`` are the original ``double_blocks.{i}`` (the model has no
single-stream blocks).  Tencent's HunyuanVideo 1.5 checkpoints name every projection on its own
(diffusers' ``scripts/convert_hunyuan_video1_5_to_diffusers.py`` renames them one to one), and
musubi-tuner's HunyuanVideo 1.5 LoRAs (``networks.lora_hv_1_5``, the ``Linear`` layers of its
``MMDoubleStreamBlock``) are named after them: the ``kohya`` files.  ComfyUI runs HunyuanVideo 1.5
on its HunyuanVideo model, whose attention projects q, k and v in one fused ``qkv``; the LoRA keys
it maps for that model are HunyuanVideo (1.0)'s original names (``img_attn_qkv``, ``img_mlp.fc1``,
``img_mod.linear``), which diffusers' ``_convert_hunyuan_video_lora_to_diffusers`` reads too: the
``comfyui`` files, peft-named (``lora_A``/``lora_B``, the scale folded into ``lora_B``) because
that converter reads no other matrices or ``alpha``:

===========================================  ==================================  =====================
diffusers (``transformer_blocks.{i}.``)      ``kohya`` (``double_blocks.{i}.``)  ``comfyui``
===========================================  ==================================  =====================
``attn.to_q | to_k | to_v``                  ``img_attn_q | img_attn_k | _v``    ``img_attn_qkv``
``attn.add_q_proj | add_k_proj | add_v_``    ``txt_attn_q | txt_attn_k | _v``    ``txt_attn_qkv``
``attn.to_out.0`` / ``attn.to_add_out``      ``img_attn_proj`` / ``txt_attn_proj``  the same
``ff.net.0.proj | ff.net.2``                 ``img_mlp.fc1 | img_mlp.fc2``       the same
``ff_context.net.0.proj | ff_context.net.2`` ``txt_mlp.fc1 | txt_mlp.fc2``       the same
``norm1.linear`` / ``norm1_context.linear``  ``img_mod.linear`` / ``txt_mod.linear``  the same
===========================================  ==================================  =====================

The fused ``qkv`` stacks the q, k and v rows (3 x hidden).  The modules outside the blocks (the
token refiner, the embedders, the final layer) have no counterpart here: the converter maps the
refiner and ``time_in`` to names HunyuanVideo 1.5 does not have or cannot read back, and
musubi-tuner trains the blocks only.
"""

from __future__ import annotations

from flowtune.interop.naming import BlockTable, OriginalNaming, OriginalSlot, block_slot

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADDED_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
# Modules named alike in both layouts: diffusers suffix -> original suffix.
_SHARED = {
    "attn.to_out.0": "img_attn_proj",
    "attn.to_add_out": "txt_attn_proj",
    "ff.net.0.proj": "img_mlp.fc1",
    "ff.net.2": "img_mlp.fc2",
    "ff_context.net.0.proj": "txt_mlp.fc1",
    "ff_context.net.2": "txt_mlp.fc2",
    "norm1.linear": "img_mod.linear",
    "norm1_context.linear": "txt_mod.linear",
}
_SEPARATE_QKV = {
    **dict(zip(_QKV, ("img_attn_q", "img_attn_k", "img_attn_v"), strict=True)),
    **dict(zip(_ADDED_QKV, ("txt_attn_q", "txt_attn_k", "txt_attn_v"), strict=True)),
}
# Per block: diffusers suffix -> (original suffix, the fused parts in row order, their sizes).
_MUSUBI: BlockTable = {
    suffix: (name, (suffix,), (1,)) for suffix, name in {**_SEPARATE_QKV, **_SHARED}.items()
}
_COMFYUI: BlockTable = {
    **{part: ("img_attn_qkv", _QKV, (1, 1, 1)) for part in _QKV},
    **{part: ("txt_attn_qkv", _ADDED_QKV, (1, 1, 1)) for part in _ADDED_QKV},
    **{suffix: (name, (suffix,), (1,)) for suffix, name in _SHARED.items()},
}


def musubi_slot(module: str) -> OriginalSlot | None:
    """The Tencent HunyuanVideo 1.5 module of the diffusers ``module`` (a
    ``HunyuanVideo15Transformer3DModel`` module name, e.g. ``"transformer_blocks.0.attn.to_q"`` ->
    ``"double_blocks.0.img_attn_q"``); None outside the table above."""
    return block_slot(module, _MUSUBI, {}, {})


def comfyui_slot(module: str) -> OriginalSlot | None:
    """The HunyuanVideo (fused ``qkv``) module of the diffusers ``module`` as ComfyUI maps it,
    e.g. ``"transformer_blocks.0.attn.to_k"`` -> ``"double_blocks.0.img_attn_qkv"`` (rows
    ``[q; k; v]``); None outside the table above."""
    return block_slot(module, _COMFYUI, {}, {})


HUNYUAN_VIDEO_NAMING = OriginalNaming(
    description="HunyuanVideo 1.5 (Tencent's double_blocks names, as musubi-tuner uses them)",
    slot=musubi_slot,
    kohya_network_module="networks.lora_hv_1_5",  # musubi-tuner's HunyuanVideo 1.5 LoRA module
    kohya_base_model_version="hv15",  # musubi-tuner's ARCHITECTURE_HUNYUAN_VIDEO_1_5
    comfyui_peft_names=True,
    comfyui_slot=comfyui_slot,
    comfyui_description="HunyuanVideo (fused qkv, the names ComfyUI maps for HunyuanVideo 1.5)",
)
