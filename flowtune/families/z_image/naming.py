"""Z-Image's LoRA names for kohya / ComfyUI export: diffusers' own module names.

Unlike FLUX, Z-Image's LoRA ecosystem names modules as diffusers does: Z-Image's own code has the
same ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` attention projections, ``feed_forward.w1..w3``
and ``adaLN_modulation.0`` layers in ``layers.{i}``, ``noise_refiner.{i}`` and
``context_refiner.{i}``.  So every module is its own slot here, nothing is fused:

- ``comfyui``: ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` without ``alpha``
  (the scale folded into ``lora_B``), the layout of ai-toolkit's Z-Image LoRAs.  ComfyUI's
  checkpoint layout fuses each block's q, k, v into ``attention.qkv`` and renames
  ``to_out.0`` to ``out``, but its LoRA loader maps these diffusers names onto it
  (``comfy.utils.z_image_to_diffusers``, the Lumina2 branch of ``model_lora_keys_unet``), and
  diffusers' Z-Image converter reads them too.
- ``kohya``: ``lora_unet_<module, dots as underscores>`` with ``lora_down`` / ``lora_up`` /
  ``alpha``, as kohya's sd-scripts / musubi-tuner (``networks.lora_zimage``) write them;
  diffusers' converter reads them back (it rejoins ``to_q``, ``feed_forward``,
  ``noise_refiner``, ``adaLN_modulation``... that the underscores split).

Only modules whose every name part diffusers' converter knows how to rejoin are exported: the
blocks' LoRA targets and modulation, and the top-level embedders and final layer.
"""

from __future__ import annotations

import re

from flowtune.interop.naming import OriginalNaming, OriginalSlot

_BLOCK_MODULE = re.compile(
    r"^(?:layers|noise_refiner|context_refiner)\.\d+\."
    r"(?:attention\.to_[qkv]|attention\.to_out\.0|feed_forward\.w[123]|adaLN_modulation\.0)$"
)
_TOP_LEVEL = (
    "all_x_embedder.2-1",
    "all_final_layer.2-1.linear",
    "all_final_layer.2-1.adaLN_modulation.1",
    "t_embedder.mlp.0",
    "t_embedder.mlp.2",
    "cap_embedder.1",
)


def z_image_slot(module: str) -> OriginalSlot | None:
    """The exported module of the diffusers ``module``: itself (see above), or None for a module
    that loaders would not find again (a custom target outside the table).

    Args:
        module: A module name of ``ZImageTransformer2DModel``, e.g. ``"layers.0.attention.to_k"``.
    """
    if _BLOCK_MODULE.match(module) or module in _TOP_LEVEL:
        return OriginalSlot(name=module, parts=(module,))
    return None


Z_IMAGE_NAMING = OriginalNaming(
    description="Z-Image (diffusers names: ai-toolkit / sd-scripts)",
    slot=z_image_slot,
    kohya_network_module="networks.lora_zimage",
    kohya_base_model_version="z_image",
    comfyui_peft_names=True,
)
