"""How a family names its LoRA modules in the original (non-diffusers) checkpoint layout.

diffusers splits some layers of the original models into several modules: FLUX.1's fused
``img_attn.qkv`` is ``attn.to_q``, ``attn.to_k`` and ``attn.to_v`` in diffusers.  Tools that use
the original layout (kohya sd-scripts, ComfyUI, Forge) expect one LoRA per *original* module, so
an export must know, for each diffusers module, which original module it belongs to and where
its output rows sit in it.  A family describes that with an :class:`OriginalNaming`, registered
as ``FamilySpec.lora_original_names``; the export code (:mod:`flowtune.interop.lora`) is the same
for every family.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class OriginalSlot:
    """Where the LoRA of one diffusers module goes in the original layout.

    Attributes:
        name: The original module, e.g. ``"double_blocks.3.img_attn.qkv"``.
        parts: The diffusers modules whose outputs the original module stacks, in row order
            (one entry when it is not fused), e.g. ``("transformer_blocks.3.attn.to_q",
            "transformer_blocks.3.attn.to_k", "transformer_blocks.3.attn.to_v")``.
        part_sizes: The parts' output sizes relative to each other, e.g. ``(1, 1, 1, 4)`` for a
            FLUX.1 single block's ``linear1`` (q, k, v: hidden; MLP: 4 x hidden).  Used to size
            the zero block of a part the LoRA does not train.
        swap_halves: The original module orders its output rows ``[b; a]`` where diffusers has
            ``[a; b]`` (FLUX.1's final ``adaLN_modulation``: shift/scale vs. scale/shift), so the
            rows of ``lora_up`` are swapped in halves.
        fold_scale: Write the LoRA scale into ``lora_up`` and ``alpha = rank`` (scale 1) instead
            of keeping it in ``alpha``.  Equivalent for every loader that reads ``alpha``; needed
            where a known loader ignores ``alpha`` for this module (diffusers' FLUX.1 converter
            reads none for ``final_layer``).
    """

    name: str
    parts: tuple[str, ...]
    part_sizes: tuple[int, ...] = (1,)
    swap_halves: bool = False
    fold_scale: bool = False

    def __post_init__(self) -> None:
        if len(self.parts) != len(self.part_sizes):
            raise ValueError(f"{self.name}: {len(self.parts)} parts but {len(self.part_sizes)} part sizes")


@dataclass(frozen=True)
class OriginalNaming:
    """A family's mapping from diffusers module names to the original layout.

    Attributes:
        description: What the original layout is, for messages (e.g. ``"FLUX.1 (BFL)"``).
        slot: ``slot(diffusers_module_name) -> OriginalSlot``, or None for a module that has no
            original counterpart (a custom LoRA target); names are relative to the transformer,
            e.g. ``"transformer_blocks.0.attn.to_q"``.
        kohya_network_module: kohya sd-scripts' ``ss_network_module`` for this family's LoRAs.
        kohya_base_model_version: kohya sd-scripts' ``ss_base_model_version``.
        comfyui_peft_names: ``comfyui`` files name the matrices as peft does (``lora_A.weight``
            [R, in], ``lora_B.weight`` [out, R]) and carry no ``alpha`` tensors: each module's
            scale is folded into ``lora_B``.  ComfyUI reads both namings; set this where the
            family's other loaders read only this one under ``diffusion_model.`` names (FLUX.2:
            ai-toolkit's layout, the only one diffusers' FLUX.2 loader converts with those names).
        comfyui_slot: The slots of ``comfyui`` files where ComfyUI maps another layout than the
            one kohya-style trainers name their modules after (HunyuanVideo 1.5: musubi-tuner
            names Tencent's separate q/k/v projections, ComfyUI maps HunyuanVideo's fused
            ``qkv``); None: ``slot`` for both formats.
        comfyui_description: ``description`` for ``comfyui`` files when ``comfyui_slot`` is set.
    """

    description: str
    slot: Callable[[str], OriginalSlot | None]
    kohya_network_module: str
    kohya_base_model_version: str
    comfyui_peft_names: bool = False
    comfyui_slot: Callable[[str], OriginalSlot | None] | None = None
    comfyui_description: str | None = None

    def for_format(self, fmt: str) -> OriginalNaming:
        """The naming that ``fmt`` (``kohya`` or ``comfyui``) files use: this one, or for
        ``comfyui`` the one of ``comfyui_slot`` when the family sets it."""
        if fmt != "comfyui" or self.comfyui_slot is None:
            return self
        description = self.comfyui_description or self.description
        return replace(self, slot=self.comfyui_slot, description=description, comfyui_slot=None)


# Per block: diffusers suffix -> (original suffix, the fused parts in row order, their relative sizes).
BlockTable = Mapping[str, tuple[str, tuple[str, ...], tuple[int, ...]]]
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def block_slot(
    module: str, double: BlockTable, single: BlockTable, top_level: Mapping[str, str]
) -> OriginalSlot | None:
    """The slot of ``module`` in a FLUX-style layout: diffusers' ``transformer_blocks.{i}`` /
    ``single_transformer_blocks.{i}`` are the original ``double_blocks.{i}`` / ``single_blocks.{i}``,
    with the modules inside a block named by ``double`` / ``single``; ``top_level`` renames
    unfused modules outside the blocks.  None when no table names it (the family may still map it
    itself, e.g. a final layer with swapped halves)."""
    match = _BLOCK.match(module)
    if match:
        kind, index, suffix = match.groups()
        table, original = (
            (double, "double_blocks") if kind == "transformer_blocks" else (single, "single_blocks")
        )
        if suffix not in table:
            return None
        name, parts, sizes = table[suffix]
        prefix = f"{kind}.{index}."
        return OriginalSlot(
            name=f"{original}.{index}.{name}", parts=tuple(prefix + p for p in parts), part_sizes=sizes
        )
    if module in top_level:
        return OriginalSlot(name=top_level[module], parts=(module,))
    return None
