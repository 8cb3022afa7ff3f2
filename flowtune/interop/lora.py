"""Convert a flowtune LoRA to the file layouts other tools load.

flowtune writes LoRAs in diffusers' layout (``transformer.<module>.lora_A.weight`` [r, in] and
``.lora_B.weight`` [out, r], float32, with the peft config in the safetensors metadata).  The
original-layout formats name modules after the model's original checkpoint and carry the scale
as an ``alpha`` tensor per module (delta W = alpha / rank * up @ down):

- ``kohya``: ``lora_unet_<original name, dots as underscores>.lora_down.weight`` [R, in],
  ``.lora_up.weight`` [out, R], ``.alpha`` (float32 scalar), plus kohya sd-scripts' ``ss_*``
  metadata.  The layout kohya sd-scripts writes.
- ``comfyui``: the same tensors keyed ``diffusion_model.<original name>.lora_down.weight`` etc.;
  for a family whose naming sets ``comfyui_peft_names`` (FLUX.2), ``.lora_A.weight`` /
  ``.lora_B.weight`` instead and no ``alpha`` (the scale folded into ``lora_B``); a family whose
  ComfyUI layout differs from its kohya one names them by ``comfyui_slot`` (HunyuanVideo 1.5).

Modules that diffusers splits and the original fuses (FLUX.1's ``qkv`` and ``linear1``) become one
exact LoRA: ``lora_down`` stacks the parts' A matrices along the rank ([sum of ranks, in]) and
``lora_up`` is block-diagonal in the parts' B matrices ([sum of outs, sum of ranks]), so
``up @ down`` is the parts' updates stacked by rows and nothing is approximated.  Parts are
padded to the largest rank among them, and a part the LoRA does not train gets zero blocks of
that rank: with equal part ranks the up matrix then has exactly the block structure that
diffusers' converter recognises, and it recovers every part's original A and B.

The family decides the original names (:class:`flowtune.interop.naming.OriginalNaming`, from
``FamilySpec.lora_original_names``); nothing here depends on the family.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from flowtune.errors import FlowtuneError
from flowtune.families import FamilySpec
from flowtune.interop.naming import OriginalNaming, OriginalSlot

FORMATS = ("diffusers", "comfyui", "kohya")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The key prefixes (and whether dots in module names become underscores) of the formats.
_ORIGINAL_KEY_STYLE = {"kohya": ("lora_unet_", True), "comfyui": ("diffusion_model.", False)}
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraModule:
    """The LoRA update of one module: ``delta W = scale * up @ down``.

    Attributes:
        down: A, [rank, in_features].
        up: B, [out_features, rank].
        scale: peft's scaling of the module (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """The weight update, [out_features, in_features], in float32."""
        return self.scale * (self.up.float() @ self.down.float())


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA file read back: its modules and its nominal settings.

    Attributes:
        modules: Module name relative to the transformer (``transformer_blocks.0.attn.to_q``) ->
            its :class:`LoraModule`, in file order.
        metadata: The file's safetensors metadata.
        rank: The nominal rank (the peft config's ``r``; the largest module rank without one).
        alpha: The nominal ``lora_alpha`` (= ``rank`` when the file has no peft config).
    """

    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    rank: int
    alpha: float


@dataclass(frozen=True)
class OriginalModule:
    """One module's LoRA in the original layout: ``delta W = alpha / R * up @ down``.

    Attributes:
        name: The original module name, e.g. ``double_blocks.0.img_attn.qkv``.
        down: [R, in_features] (R = the parts' padded ranks summed).
        up: [out_features, R].
        alpha: Scalar; the scale is ``alpha / R``.
        parts: The diffusers modules it fuses (all of its slot's parts, trained or not).
    """

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    parts: tuple[str, ...]


def _adapter_config(metadata: dict[str, str], prefix: str) -> dict:
    """The peft config that diffusers stores in ``lora_adapter_metadata``, keys without ``prefix.``."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    packed = json.loads(raw)
    return {k[len(prefix) + 1 :]: v for k, v in packed.items() if k.startswith(prefix + ".")}


def read_lora(path: Path, prefix: str = "transformer") -> LoraWeights:
    """Read a diffusers-layout LoRA file (what flowtune writes) into per-module A, B and scale.

    The scale of each module follows peft: ``alpha / r`` with ``alpha`` from the config's
    ``alpha_pattern`` or ``lora_alpha`` and ``r`` the module's rank (``alpha / sqrt(r)`` with
    ``use_rslora``); a file without a peft config has ``alpha = r`` (scale 1), as diffusers assumes.
    flowtune's own files hold each scale multiplied into ``lora_B`` with alpha = rank in their
    peft config (:func:`flowtune.train.model.save_lora`); their trained scaling
    (``flowtune.trained_lora``) is read instead and divided back out of B, so the modules have
    their trained B and scale (exactly for a power-of-two scale, else to float32 rounding) and
    ``alpha`` / ``rank`` are the trained ones.

    Args:
        path: The ``.safetensors`` file.
        prefix: The key prefix of the transformer's modules (the pipeline's ``transformer_name``).

    Raises:
        FlowtuneError: a tensor that is not a plain LoRA A or B weight (DoRA magnitudes, LoRA
            biases, another component's LoRA), or an A without its B.
    """
    from safetensors import safe_open

    from flowtune.train.model import META_TRAINED_LORA, lora_scale

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    config = _adapter_config(metadata, prefix)
    # A flowtune file: B holds the trained B times the trained scale; its peft config says scale 1.
    trained = json.loads(metadata[META_TRAINED_LORA]) if metadata.get(META_TRAINED_LORA) else None

    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith(prefix + ".") and key.endswith(_LORA_A):
            downs[key[len(prefix) + 1 : -len(_LORA_A)]] = tensor
        elif key.startswith(prefix + ".") and key.endswith(_LORA_B):
            ups[key[len(prefix) + 1 : -len(_LORA_B)]] = tensor
        else:
            raise FlowtuneError(
                f"{path} holds {key!r}, which is not a LoRA A/B weight of the {prefix}; only plain LoRA "
                "layers (no DoRA, no LoRA bias) convert to other layouts; use --format diffusers"
            )
    if downs.keys() != ups.keys():
        module = sorted(downs.keys() ^ ups.keys())[0]
        raise FlowtuneError(
            f"{path} has only one of lora_A/lora_B for module {module!r}; the file is damaged"
        )

    modules: dict[str, LoraModule] = {}
    for module, down in downs.items():
        rank = int(down.shape[0])
        up = ups[module]
        if trained is not None:
            scale = lora_scale(trained, module, rank)
            up = up / scale  # as flowtune.train.model.load_lora divides it out
        else:
            scale = lora_scale(config, module, rank)
        modules[module] = LoraModule(down=down, up=up, scale=scale)
    config = trained or config
    rank = int(config.get("r") or max((m.rank for m in modules.values()), default=0))
    return LoraWeights(
        modules=modules, metadata=metadata, rank=rank, alpha=float(config.get("lora_alpha", rank))
    )


def _fuse(slot: OriginalSlot, present: dict[str, LoraModule], fold_scale: bool = False) -> OriginalModule:
    """The original-layout LoRA of ``slot`` from the LoRAs of its trained parts (see module doc);
    ``fold_scale`` (or the slot's own) writes the scale into ``up`` and gives alpha = rank."""
    modules = list(present.values())
    in_features = {int(m.down.shape[1]) for m in modules}
    if len(in_features) != 1:
        raise FlowtuneError(f"the LoRA parts of {slot.name} have different input sizes {sorted(in_features)}")
    (n_in,) = in_features
    # The output size of one unit of part_sizes, measured on the trained parts.
    units = {m.up.shape[0] / slot.part_sizes[slot.parts.index(p)] for p, m in present.items()}
    if len(units) != 1 or not float(next(iter(units))).is_integer():
        raise FlowtuneError(f"the LoRA parts of {slot.name} have output sizes that do not fit its layout")
    unit = int(next(iter(units)))
    rank = max(m.rank for m in modules)
    shared_scale = all(m.scale == modules[0].scale for m in modules)
    scale = modules[0].scale if shared_scale else 1.0

    downs, ups = [], []
    for part, size in zip(slot.parts, slot.part_sizes, strict=True):
        module = present.get(part)
        if module is None:
            downs.append(torch.zeros(rank, n_in))
            ups.append(torch.zeros(size * unit, rank))
            continue
        pad = rank - module.rank
        down = torch.nn.functional.pad(module.down.float(), (0, 0, 0, pad))  # [rank, in]
        up = torch.nn.functional.pad(module.up.float(), (0, pad))  # [out, rank]
        downs.append(down)
        ups.append(up if shared_scale else up * module.scale)
    down = torch.cat(downs, dim=0)  # [parts x rank, in]
    up = torch.block_diag(*ups)  # [sum of outs, parts x rank]
    if slot.swap_halves:
        first, second = up.chunk(2, dim=0)
        up = torch.cat([second, first], dim=0)
    if (slot.fold_scale or fold_scale) and scale != 1.0:
        up, scale = up * scale, 1.0
    return OriginalModule(name=slot.name, down=down, up=up, alpha=scale * down.shape[0], parts=slot.parts)


def to_original(lora: LoraWeights, naming: OriginalNaming, fold_scales: bool = False) -> list[OriginalModule]:
    """The LoRA in the original layout, one entry per original module, in the file's order;
    ``fold_scales`` writes every module's scale into its ``up`` (alpha = rank, for a file
    without ``alpha`` tensors).

    Raises:
        FlowtuneError: a module with no original counterpart (e.g. a custom ``lora.target_modules``
            entry), naming it.
    """
    slots: dict[str, OriginalSlot] = {}
    members: dict[str, dict[str, LoraModule]] = {}
    unmapped = []
    for module, weights in lora.modules.items():
        slot = naming.slot(module)
        if slot is None or module not in slot.parts:
            unmapped.append(module)
            continue
        slots[slot.name] = slot
        members.setdefault(slot.name, {})[module] = weights
    if unmapped:
        more = f" (and {len(unmapped) - 1} more)" if len(unmapped) > 1 else ""
        raise FlowtuneError(
            f"LoRA module {unmapped[0]!r}{more} has no counterpart in the {naming.description} layout "
            "that kohya/ComfyUI files use; export with --format diffusers (ComfyUI and diffusers load it)"
        )
    return [_fuse(slots[name], members[name], fold_scales) for name in slots]


def original_state_dict(
    modules: list[OriginalModule], fmt: str, dtype: torch.dtype, peft_names: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a ``kohya`` or ``comfyui`` file: ``lora_down``/``lora_up`` in ``dtype``,
    ``alpha`` as a float32 scalar; with ``peft_names``, ``lora_A``/``lora_B`` and no ``alpha``
    (the modules' scales must already be folded: alpha = rank)."""
    key_prefix, flatten = _ORIGINAL_KEY_STYLE[fmt]
    state: dict[str, torch.Tensor] = {}
    for module in modules:
        base = key_prefix + (module.name.replace(".", "_") if flatten else module.name)
        if peft_names:
            if module.alpha != module.down.shape[0]:
                raise ValueError(f"{module.name}: a file without alpha needs the scale folded into lora_B")
            state[f"{base}.lora_A.weight"] = module.down.to(dtype).contiguous()
            state[f"{base}.lora_B.weight"] = module.up.to(dtype).contiguous()
            continue
        state[f"{base}.lora_down.weight"] = module.down.to(dtype).contiguous()
        state[f"{base}.lora_up.weight"] = module.up.to(dtype).contiguous()
        state[f"{base}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
    return state


def original_metadata(lora: LoraWeights, naming: OriginalNaming) -> dict[str, str]:
    """Metadata of a ``kohya``/``comfyui`` file: flowtune's ``flowtune.*`` keys and kohya's ``ss_*``.

    diffusers' ``lora_adapter_metadata`` is left out on purpose: the scale now lives in the
    ``alpha`` tensors (or in ``lora_B``), and diffusers would apply the peft config's alpha a
    second time.  So are the keys that describe how flowtune's own file stores its scale
    (``flowtune.trained_lora``, ``flowtune.resume_file``): they do not describe this file.
    """
    from flowtune.train.model import META_RESUME_FILE, META_TRAINED_LORA

    metadata = {
        k: v
        for k, v in lora.metadata.items()
        if k.startswith("flowtune.") and k not in (META_TRAINED_LORA, META_RESUME_FILE)
    }
    metadata.update(
        {
            "format": "pt",
            "ss_network_module": naming.kohya_network_module,
            "ss_network_dim": str(lora.rank),
            "ss_network_alpha": f"{lora.alpha:g}",
            "ss_base_model_version": naming.kohya_base_model_version,
        }
    )
    return metadata


def stored_dtype(lora: LoraWeights) -> torch.dtype:
    """The dtype the file stores its LoRA weights in (float32 for flowtune's own files)."""
    first = next(iter(lora.modules.values()), None)
    return first.down.dtype if first is not None else torch.float32


def write_lora(
    lora_file: Path, spec: FamilySpec, fmt: str, out: Path, dtype: torch.dtype | None
) -> tuple[int, int | None]:
    """Write the LoRA of ``lora_file`` to ``out`` (a temporary file that the caller renames) in
    ``fmt``, its weights in ``dtype`` (None = as stored).

    Returns:
        (number of LoRA modules, number of original modules written; None for ``diffusers``).

    Raises:
        FlowtuneError: the family has no original layout, or the LoRA has modules outside it.
    """
    from safetensors.torch import save_file

    prefix = spec.lora_class().transformer_name
    if fmt == "diffusers":
        from safetensors import safe_open

        # The file already is in diffusers' layout, with its peft config: copied as it is, or
        # with its weights cast.
        with safe_open(str(lora_file), framework="pt") as handle:
            keys = list(handle.keys())  # noqa: SIM118 - not a dict
            if dtype is None:
                shutil.copyfile(lora_file, out)
            else:
                tensors = {k: handle.get_tensor(k).to(dtype) for k in keys}
                save_file(tensors, str(out), metadata=handle.metadata())
        return sum(k.endswith(_LORA_A) for k in keys), None

    naming = spec.load_lora_original_names()
    if naming is None:
        raise FlowtuneError(
            f"model family {spec.name!r} has no original-layout LoRA naming for --format {fmt}; "
            "use --format diffusers"
        )
    naming = naming.for_format(fmt)
    lora = read_lora(lora_file, prefix)
    peft_names = fmt == "comfyui" and naming.comfyui_peft_names
    modules = to_original(lora, naming, fold_scales=peft_names)
    state = original_state_dict(modules, fmt, dtype or stored_dtype(lora), peft_names)
    save_file(state, str(out), metadata=original_metadata(lora, naming))
    return len(lora.modules), len(modules)
