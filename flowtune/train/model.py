"""The trainable transformer: loaded frozen, wrapped with LoRA through peft, saved the diffusers way.

- :func:`load_transformer` loads only the ``transformer`` subfolder of ``model.pretrained`` in
  ``model.dtype`` (the VAE and text encoders are never loaded for training: their outputs are in
  the preprocess cache); with ``model.quantize`` its linear weights are then quantized
  (:mod:`flowtune.memory.quantize`), before any LoRA is added.
- :func:`add_lora` adds peft LoRA layers (``transformer.add_adapter(LoraConfig(...))``) on the
  recipe's or the family's target modules; everything else stays frozen.  Trainable LoRA weights
  are kept in float32 whatever the base dtype, so optimizer updates are not rounded away; under
  autocast their layers take the input as it is (:class:`CastUnlessAutocast`).
- :func:`save_lora` writes ``pytorch_lora_weights.safetensors`` through the family pipeline's own
  ``save_lora_weights`` with each module's scale ``alpha / rank`` multiplied into its ``lora_B``
  and alpha = rank in the peft config of the file's metadata, so every loader applies exactly the
  trained update: diffusers' ``load_lora_weights`` (which reads that config), and ComfyUI and
  kohya-style loaders (which ignore the metadata and take alpha = rank when a module has no
  ``.alpha`` tensor).  :func:`load_lora` divides the scale back out to resume training.

Target modules are peft suffixes (``attn.to_q`` matches every ``...attn.to_q``) or, with a ``*``,
glob patterns over full module names (``single_transformer_blocks.*.proj_out``), which reach
layers whose bare suffix would also match others (FLUX.1's final ``proj_out``).
"""

from __future__ import annotations

import fnmatch
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowtune.errors import FlowtuneError
from flowtune.families import FamilySpec

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_LORA_A = ".lora_A.weight"


def expand_target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Targets for peft: suffixes kept as they are, ``*`` patterns replaced by the full names of
    the modules they match.

    Raises:
        FlowtuneError: a target (suffix or pattern) that matches no module of ``model``.
    """
    names = [name for name, _ in model.named_modules() if name]
    expanded: list[str] = []
    for target in targets:
        if "*" in target:
            matches = [name for name in names if fnmatch.fnmatchcase(name, target)]
        else:
            matches = [target] if any(n == target or n.endswith("." + target) for n in names) else []
        if not matches:
            raise FlowtuneError(
                f"lora.target_modules entry {target!r} matches no module of the transformer; give a "
                "module name suffix such as attn.to_q, or a pattern such as single_transformer_blocks.*.proj_out"
            )
        expanded.extend(m for m in matches if m not in expanded)
    return expanded


class CastUnlessAutocast:
    """True, as peft LoRA layers' ``cast_input_dtype_enabled``, only while autocast is off.

    Before ``lora_A``, peft casts a layer's input to the LoRA weights' dtype: a float32 copy of
    a bf16 activation ``[batch, tokens, in_features]`` (4 bytes a value, 0.43 GiB for FLUX.2's
    widest layer at 1024 px).  Under autocast (``train.mixed_precision: bf16``, validation)
    ``lora_A`` then casts that copy back to bf16 and keeps it for its backward, so every LoRA
    layer holds a second bf16 copy of its input while its block is recomputed.  Both copies are
    exact, so skipping them changes no value; without autocast (``train.mixed_precision: no``)
    the cast is what lets a bf16 input meet float32 LoRA weights, so it stays.  peft reads the
    attribute at every call, so one instance serves every layer, in every context.
    """

    def __bool__(self) -> bool:
        return not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))

    def __repr__(self) -> str:
        return "CastUnlessAutocast()"


CAST_UNLESS_AUTOCAST = CastUnlessAutocast()


def load_transformer(
    spec: FamilySpec,
    model_dir: Path,
    dtype: torch.dtype,
    variant: str | None = None,
    quantize: str | None = None,
    device: torch.device | str | None = None,
    host: tuple[str, ...] | list[str] = (),
    subfolder: str = "transformer",
) -> nn.Module:
    """The family's transformer from ``model_dir/transformer``, in ``dtype``, frozen, in train mode,
    patched with the family's memory-lean stand-ins (``FamilySpec.patch_transformer``).

    Args:
        quantize: ``model.quantize``: store the linear weights (but the family's
            ``quantize_skip``) as ``int8``, ``fp8`` or ``nf4`` (:mod:`flowtune.memory.quantize`),
            before any LoRA is added.  The summary is left on the model as
            ``flowtune_quantized``.  None = weights stay in ``dtype``.
        device: Where quantized layers are quantized and kept (None = the CPU it loads on).
        host: Blocks whose quantized layers go back to the CPU (``train.block_offload``'s
            offloaded blocks: :func:`flowtune.train.offload.offloaded_block_names`).
        subfolder: The transformer's folder: ``transformer_2`` for the low-noise expert of a
            two-expert pipeline (``model.expert``, :mod:`flowtune.experts`).
    """
    import diffusers

    from flowtune.quiet import quiet_libraries

    quiet_libraries()
    cls = getattr(diffusers, spec.transformer_class)
    kwargs: dict[str, Any] = {"subfolder": subfolder, "dtype": dtype}
    if variant is not None:
        kwargs["variant"] = variant
    transformer = spec.patch_transformer(cls.from_pretrained(model_dir, **kwargs))
    transformer.requires_grad_(False)
    if quantize is not None:
        from flowtune.memory.quantize import quantize_linears

        transformer.flowtune_quantized = quantize_linears(
            transformer, quantize, spec.quantize_skip, device, host
        )
    transformer.train()
    return transformer


def add_lora(
    transformer: nn.Module,
    spec: FamilySpec,
    *,
    rank: int,
    alpha: int,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    init: str = "default",
) -> list[nn.Parameter]:
    """Add LoRA layers (peft) and return the trainable parameters (the LoRA A and B matrices).

    Args:
        transformer: The frozen diffusers transformer.
        spec: Its family (default targets: ``spec.lora_target_modules``).
        rank, alpha, dropout: ``lora.rank``, ``lora.alpha``, ``lora.dropout``.
        target_modules: ``lora.target_modules`` (suffixes or ``*`` patterns); None = the family's.
        init: ``lora.init``: ``"default"`` (Kaiming A, zero B) or ``"gaussian"``.
    """
    from peft import LoraConfig

    targets = expand_target_modules(transformer, list(target_modules or spec.lora_target_modules))
    with warnings.catch_warnings():
        # On a torchao-quantized base (model.quantize) peft warns that its LoRA layers cannot
        # merge into the quantized weights; flowtune never merges while training (export
        # --merge fuses the saved LoRA into the unquantized base).
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass")
        transformer.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=alpha,
                lora_dropout=dropout,
                target_modules=targets,
                init_lora_weights=True if init == "default" else init,
            )
        )
    from diffusers.training_utils import cast_training_params

    cast_training_params(transformer, dtype=torch.float32)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = CAST_UNLESS_AUTOCAST
    return [p for p in transformer.parameters() if p.requires_grad]


def make_fully_trainable(transformer: nn.Module) -> list[nn.Parameter]:
    """Unfreeze every transformer weight (``train.mode: full``), kept in float32 as master
    weights whatever ``model.dtype`` is; returns them."""
    from diffusers.training_utils import cast_training_params

    transformer.requires_grad_(True)
    cast_training_params(transformer, dtype=torch.float32)
    return list(transformer.parameters())


# Keys flowtune adds to the safetensors metadata of every LoRA it writes, next to diffusers'
# ``lora_adapter_metadata`` (the peft config: rank ``r``, ``lora_alpha``, ``target_modules``).
META_FAMILY = "flowtune.family"
META_BASE_MODEL = "flowtune.base_model"
META_STEP = "flowtune.step"
META_VERSION = "flowtune.version"
# The trained adapter's scaling settings (JSON: r, lora_alpha, rank_pattern, alpha_pattern,
# use_rslora): the file's lora_B weights are the trained ones times each module's scale (see
# save_lora), and the file's own peft config says alpha = rank.
META_TRAINED_LORA = "flowtune.trained_lora"
# Names the file beside it that holds the trained weights unscaled, written only when dividing
# the scale back out would not restore them bit for bit (a scale that is not a power of two).
META_RESUME_FILE = "flowtune.resume_file"
RESUME_LORA_NAME = "resume_lora_weights.safetensors"

_SCALING_KEYS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``transformer`` (peft names, e.g. ``transformer_blocks.0.attn.to_q.
    lora_A.weight``: A is [rank, in_features], B is [out_features, rank]) as full tensors.

    Under FSDP2 the parameters are DTensor shards; they are gathered here, which is a collective:
    every process must call it.
    """
    from peft.utils import get_peft_model_state_dict
    from torch.distributed.tensor import DTensor

    from flowtune.flow_matching.adapters.base import unwrap_model

    state = get_peft_model_state_dict(unwrap_model(transformer))
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def lora_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scale of one LoRA module: ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA), its
    alpha from the config's ``alpha_pattern`` or ``lora_alpha`` (= ``rank`` when neither is set,
    as diffusers assumes for a file without a peft config).

    Args:
        config: The peft config (``r``, ``lora_alpha``, ``alpha_pattern``, ``use_rslora``).
        module: The module name relative to the transformer.
        rank: The module's rank (the rows of its ``lora_A``).
    """
    from peft.utils.other import get_pattern_key

    alpha_pattern: dict = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config.get("lora_alpha", rank))
    return float(alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def _scaled_modules(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, float]:
    """``{lora_B key: its module's scale}`` of a peft-named state dict."""
    return {
        f"{module}.lora_B.weight": lora_scale(config, module, int(a.shape[0]))
        for module, a in ((k.removesuffix(_LORA_A), v) for k, v in state.items() if k.endswith(_LORA_A))
    }


def _unscale(weight: torch.Tensor, scale: float) -> torch.Tensor:
    """The trained ``lora_B`` from a saved one (the single place the scale is divided out)."""
    return weight / scale


def save_lora(
    transformer: nn.Module,
    spec: FamilySpec,
    out_dir: Path,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    state: dict[str, torch.Tensor] | None = None,
    name: str = LORA_WEIGHTS_NAME,
) -> Path:
    """Write the LoRA of ``transformer`` as ``out_dir/pytorch_lora_weights.safetensors``.

    Goes through ``<family pipeline>.save_lora_weights`` (diffusers key naming).  Each module's
    scale (peft's ``alpha / rank``) is multiplied into its ``lora_B`` and the peft config in
    diffusers' ``lora_adapter_metadata`` says alpha = rank (scale 1), so the file means the same
    to every loader: diffusers' ``load_lora_weights`` reads that config; ComfyUI and kohya-style
    loaders ignore the metadata and take alpha = rank for a module without an ``.alpha`` tensor.
    For a power-of-two scale (alpha = rank, 2 x rank, rank / 2, ...) the product is exact, and
    so is every loader's update; otherwise it is rounded once, to float32 precision.

    The metadata also holds the trained scaling (:data:`META_TRAINED_LORA`), from which
    :func:`load_lora` divides the scale back out to resume training.  Where that division would
    not give the trained weights back bit for bit (a scale that is not a power of two), they are
    also written unscaled beside the file (:data:`RESUME_LORA_NAME`, named by
    :data:`META_RESUME_FILE`), with the trained peft config, for :func:`load_lora` to read.
    Plus ``flowtune.family`` and whatever ``metadata`` adds (:data:`META_BASE_MODEL`, ...).

    Args:
        dtype: Cast the weights to this dtype when saving (None = as trained, float32).
        metadata: Extra string metadata entries.
        state: The weights, already gathered by :func:`lora_state_dict` (under FSDP every process
            gathers, one writes); None = taken from ``transformer``.
        name: The file's name (another for a second LoRA in the same folder: each expert's of a
            two-expert run, :mod:`flowtune.experts`); its unscaled copy is ``resume_`` + name.
    """
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save_file

    from flowtune.flow_matching.adapters.base import unwrap_model

    model = unwrap_model(transformer)
    if state is None:
        state = lora_state_dict(model)
    state = {k: v.detach().cpu() for k, v in state.items()}
    trained = {
        k: sorted(v) if isinstance(v, set) else v for k, v in model.peft_config["default"].to_dict().items()
    }
    # Dropout is a training setting (it stays in recipe.yaml).  diffusers' load_lora_weights leaves
    # the new LoRA layers in train mode, so a recorded dropout would randomly drop parts of the
    # update at inference; recorded as 0, the file samples deterministically everywhere.
    trained["lora_dropout"] = 0.0
    scales = _scaled_modules(state, trained)
    scaled = {k: v * scales[k] if k in scales else v for k, v in state.items()}
    exact = all(
        _is_power_of_two(scale) and torch.equal(_unscale(scaled[k], scale), state[k])
        for k, scale in scales.items()
    )
    # The file's own config: alpha = rank for every module (rank_pattern's modules too), scale 1.
    config = {
        **trained,
        "lora_alpha": trained["r"],
        "alpha_pattern": dict(trained.get("rank_pattern") or {}),
        "use_rslora": False,
    }
    pipeline_class = spec.lora_class()  # the pipeline class, or the family's lora_loader

    def write(weights: dict[str, torch.Tensor], name: str, peft_config: dict, extra: dict[str, str]) -> None:
        if dtype is not None:
            weights = {k: v.to(dtype) for k, v in weights.items()}
        # diffusers' layout of the adapter metadata: the peft config keys prefixed "transformer.".
        packed = pipeline_class.pack_weights(peft_config, pipeline_class.transformer_name)
        header = {
            "format": "pt",
            LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True),
            META_FAMILY: spec.name,
            **(metadata or {}),
            **extra,
        }
        pipeline_class.save_lora_weights(
            out_dir,
            transformer_lora_layers=weights,
            weight_name=name,
            # diffusers' own writer adds only its adapter metadata; this one adds flowtune's too.
            save_function=lambda tensors, filename: save_file(tensors, filename, metadata=header),
        )

    extra = {
        META_TRAINED_LORA: json.dumps({k: trained[k] for k in _SCALING_KEYS if k in trained}, sort_keys=True)
    }
    if not exact:
        resume_name = _resume_name(name)
        write(state, resume_name, trained, {})
        extra[META_RESUME_FILE] = resume_name
    write(scaled, name, config, extra)
    return Path(out_dir) / name


def _resume_name(name: str) -> str:
    """The unscaled copy's file name of LoRA file ``name`` (:data:`RESUME_LORA_NAME` for the
    usual one)."""
    return RESUME_LORA_NAME if name == LORA_WEIGHTS_NAME else f"resume_{name}"


def read_lora_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of a LoRA file (``{}`` if it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_lora(transformer: nn.Module, directory: Path, name: str = LORA_WEIGHTS_NAME) -> None:
    """Load the trained LoRA weights that :func:`save_lora` wrote to ``directory`` into the LoRA
    layers already added to ``transformer`` by :func:`add_lora`, bit for bit (to resume training).

    The scales that ``pytorch_lora_weights.safetensors`` holds in its ``lora_B`` weights are
    divided back out (the trained scaling is in its metadata, :data:`META_TRAINED_LORA`), or, where
    that would not be exact, the unscaled weights are read from the file it names
    (:data:`META_RESUME_FILE`).  A file without that metadata (written before flowtune scaled
    its files) holds the trained weights as they are.

    Raises:
        FlowtuneError: a file is missing, unreadable (truncated), or its layers do not match the
            transformer's (another rank or other target modules).
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from flowtune.flow_matching.adapters.base import unwrap_model

    path = Path(directory) / name
    if not path.is_file():
        raise FlowtuneError(f"no LoRA weights at {path}")
    tensors = _read_tensors(path, load_file)
    saved = read_lora_metadata(path)
    if saved.get(META_RESUME_FILE):
        path = Path(directory) / saved[META_RESUME_FILE]
        if not path.is_file():
            raise FlowtuneError(
                f"{path} is missing (the unscaled LoRA weights that resuming from {directory} reads)"
            )
        tensors = _read_tensors(path, load_file)
    prefix = "transformer."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if saved.get(META_TRAINED_LORA) and not saved.get(META_RESUME_FILE):
        scales = _scaled_modules(state, json.loads(saved[META_TRAINED_LORA]))
        state = {k: _unscale(v, scales[k]) if k in scales else v for k, v in state.items()}
    model = unwrap_model(transformer)
    try:
        result = set_peft_model_state_dict(model, state, adapter_name="default")
    except RuntimeError as exc:  # shape mismatch: another rank
        raise FlowtuneError(f"the LoRA in {path} does not fit this model's LoRA layers: {exc}") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    expected = {k for k in model.state_dict() if ".lora_" in k}
    loaded = {k.replace(".weight", ".default.weight") for k in state}
    missing = sorted(expected - loaded)
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise FlowtuneError(
            f"the LoRA in {path} targets other modules than this recipe's lora.target_modules "
            f"({len(unexpected)} unexpected, {len(missing)} missing layers, e.g. {example})"
        )


def save_full(transformer: nn.Module, out_dir: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the whole transformer (full fine-tuning) as ``out_dir/transformer`` in diffusers
    format, loadable by the family's transformer class ``from_pretrained``.

    Args:
        state: The full state dict already gathered from FSDP shards (Accelerate's
            ``get_state_dict``); written with the config in the same sharded safetensors layout
            as ``save_pretrained``.  None = ``save_pretrained`` of the model itself.
    """
    from huggingface_hub import save_torch_state_dict

    from flowtune.flow_matching.adapters.base import unwrap_model

    target = Path(out_dir) / "transformer"
    model = unwrap_model(transformer)
    if state is None:
        model.save_pretrained(target, safe_serialization=True)
    else:
        model.save_config(target)
        save_torch_state_dict(
            {k: v.contiguous() for k, v in state.items()},
            target,
            filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
            max_shard_size="10GB",
        )
    return target


def load_full(transformer: nn.Module, directory: Path) -> None:
    """Load the weights written by :func:`save_full` into ``transformer`` in place, bit for bit.

    Raises:
        FlowtuneError: no weights, an unreadable (truncated) file, or weights of another model.
    """
    from safetensors.torch import load_file

    from flowtune.flow_matching.adapters.base import unwrap_model

    files = sorted((Path(directory) / "transformer").glob("*.safetensors"))
    if not files:
        raise FlowtuneError(f"no transformer weights in {Path(directory) / 'transformer'}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_read_tensors(file, load_file))
    model = unwrap_model(transformer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FlowtuneError(
            f"the transformer in {directory} does not match this model "
            f"({len(missing)} missing, {len(unexpected)} unexpected weights)"
        )


def _read_tensors(path: Path, load_file: Any) -> dict[str, torch.Tensor]:
    """``load_file(path)`` (safetensors); a truncated or damaged file is a one-line error naming it."""
    try:
        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error kinds
        lines = str(exc).strip().splitlines()
        raise FlowtuneError(
            f"{path} is unreadable, truncated or damaged ({lines[0] if lines else type(exc).__name__})"
        ) from None
