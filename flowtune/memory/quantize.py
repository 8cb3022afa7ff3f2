"""Quantize the frozen transformer's (``model.quantize``) and text encoders'
(``model.encoder_quantize``) linear weights with torchao.

LoRA training reads the base weights but never updates them, so they can be stored in fewer bits
(QLoRA): the LoRA layers that peft adds afterwards train in float32 on top of them.

- ``int8``: torchao ``Int8WeightOnlyConfig``, int8 weights with one scale per output row
  (half of bf16).
- ``fp8``: float8 e4m3 weights with one scale per output row (half of bf16).  Quantized on a
  GPU that has float8 matmuls (CUDA compute capability 8.9+: Ada, Hopper, Blackwell), torchao's
  ``Float8DynamicActivationFloat8WeightConfig`` with row-wise scales: the forward quantizes each
  layer's input row by row on the fly and multiplies in float8 (``torch._scaled_mm``).
  Elsewhere (CPU, Ampere) ``Float8WeightOnlyConfig``: the same storage, computed after
  dequantizing to the input's dtype.
- ``nf4``: torchao's ``NF4Tensor`` (``to_nf4``), as torchtune's QLoRA stores its frozen linear
  weights: 4-bit NormalFloat in blocks of 64 with double-quantized scales (about a quarter of
  bf16).  A linear whose weight holds an NF4Tensor computes through torchao's ``linear_nf4``
  (``F.linear`` is overridden by the tensor), so it stays a plain ``nn.Linear`` that peft wraps.

Every quantized layer becomes a :class:`~flowtune.memory.quantized_linear.QuantizedLinear`,
whose forward and backward keep no dequantized copy and dequantize a slice of rows at a time
(:mod:`flowtune.memory.quantized_linear`).

Order matters: quantize first, then add the LoRA.  peft wraps an int8/fp8 linear (a torchao
tensor subclass weight) in its ``TorchaoLoraLinear`` and an NF4 one in its plain LoRA ``Linear``;
both compute ``base(x) + lora_B(lora_A(x)) * scale`` without touching the base weight.

Which layers stay in ``model.dtype`` is each family's choice (``FamilySpec.quantize_skip``):
typically the embedders, the modulation (norm) layers and the final projection, which are small
and sensitive.  Layers whose shape the mode cannot store are also kept (NF4 needs a multiple of
64 weights; real FLUX layers always are), and counted in the summary.

The text encoders (:func:`quantize_text_encoders`) are quantized the same way, to save memory
where preprocess and sampling run them: which encoders, and which of their layers stay in
``model.dtype``, is the family's ``encoder_quantize_skip``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flowtune.errors import FlowtuneError
from flowtune.memory.quantized_linear import adopt

QUANTIZE_MODES: tuple[str, ...] = ("int8", "fp8", "nf4")

# torchtune's QLoRA defaults: 64 weights per NF4 block, 256 block scales per scale-of-scales block.
NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256


@dataclass
class QuantizeSummary:
    """What :func:`quantize_linears` did.

    Attributes:
        mode: The ``model.quantize`` mode.
        quantized: Names of the linear layers whose weights were quantized.
        kept: Linear layers kept in their dtype because the family's ``quantize_skip`` names them.
        unsupported: Linear layers kept because the mode cannot store their shape.
        fp8_matmuls: Layers computed with float8 matmuls (``fp8`` on a GPU that has them); the
            other quantized layers dequantize their weights.
    """

    mode: str
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    fp8_matmuls: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the training banner, e.g. ``int8 weights in 120 of 130 linear layers``."""
        total = len(self.quantized) + len(self.kept) + len(self.unsupported)
        line = f"{self.mode} weights in {len(self.quantized)} of {total} linear layers"
        if self.unsupported:
            line += f" ({len(self.unsupported)} too small for {self.mode}, kept)"
        if self.mode == "fp8" and self.fp8_matmuls:
            line += f", float8 matmuls in {len(self.fp8_matmuls)}"
        elif self.mode == "fp8" and self.quantized:
            line += ", weight-only (this device has no float8 matmuls)"
        return line


def matches_any(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether module ``name`` or one of its parents matches a pattern: a full module name
    (``proj_out`` is the top-level final projection only, not ``single_transformer_blocks.0.
    proj_out``) or a ``*`` glob over full names (``transformer_blocks.*.norm1.linear``).  A parent
    match covers its children (``time_text_embed`` keeps ``time_text_embed.timestep_embedder.
    linear_1``)."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, pattern) for pattern in patterns for prefix in prefixes)


def map_tensor(tensor: torch.Tensor, fn: Any) -> torch.Tensor:
    """``fn`` applied to a plain tensor, or to each inner tensor of a traceable wrapper subclass
    (torchao's quantized weights: int8 data and scales, NF4 codes and scales), rebuilt as that
    subclass: so a quantized weight can be pinned and copied between devices like a plain one."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return fn(tensor)
    names, context = tensor.__tensor_flatten__()
    inner = {name: map_tensor(getattr(tensor, name), fn) for name in names}
    return type(tensor).__tensor_unflatten__(inner, context, tensor.size(), tensor.stride())


def inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``tensor``'s bytes (itself, or a subclass's inner tensors)."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [t for name in names for t in inner_tensors(getattr(tensor, name))]


def check_quantize_available(mode: str, key: str = "model.quantize") -> None:
    """Refuse a mode that is unknown or whose package (torchao) is missing, in one line.

    Args:
        key: How the message names the setting (``model.encoder_quantize``, ``--quantize``).

    Raises:
        FlowtuneError: naming ``key`` and what to do.
    """
    if mode not in QUANTIZE_MODES:
        raise FlowtuneError(
            f"{key}={mode!r} is not a quantization mode; use one of {', '.join(QUANTIZE_MODES)}, or null"
        )
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise FlowtuneError(
            f"{key}={mode} needs torchao; install it with `pip install torchao`, or set {key}=null"
        ) from None


def nf4_scaler_block_size(numel: int) -> int | None:
    """The scale-of-scales block for a weight of ``numel`` values: torchtune's 256 where the
    number of 64-weight blocks allows it, else the largest power of two that divides that number
    (small layers of test models); None when ``numel`` is not a multiple of 64 (not storable)."""
    if numel % NF4_BLOCK_SIZE:
        return None
    blocks = numel // NF4_BLOCK_SIZE
    size = NF4_SCALER_BLOCK_SIZE
    while blocks % size:
        size //= 2
    return size


def has_fp8_matmuls(device: torch.device | str | None) -> bool:
    """Whether ``device`` multiplies float8 matrices (``torch._scaled_mm`` with row-wise
    scales): a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def quantize_linears(
    model: nn.Module,
    mode: str,
    skip: tuple[str, ...] | list[str] = (),
    device: torch.device | str | None = None,
    host: tuple[str, ...] | list[str] = (),
    fp8_matmuls: bool | None = None,
) -> QuantizeSummary:
    """Quantize, in place, the weights of every ``nn.Linear`` of the frozen ``model`` that ``skip``
    does not name (see :func:`matches_any`).  Call it before adding the LoRA.

    Weights keep their shapes ([out_features, in_features]) and their logical dtype (the dtype the
    model was loaded in); they are stored as torchao tensor subclasses, do not require grad, and
    are dequantized block by block in the forward pass.  Biases are untouched.  Layers are
    quantized one at a time, so only one layer's full-precision weight is on ``device`` at once.

    Args:
        model: The frozen transformer (``requires_grad`` off), in ``model.dtype``.
        mode: ``int8``, ``fp8`` or ``nf4``.
        skip: The family's ``quantize_skip`` patterns.
        device: Move each quantized layer there first (quantizing on the GPU is faster, and the
            full-precision weights never reach it all at once); None = where the model is.
        host: Module names (and their children) whose layers go back to the CPU once quantized:
            the blocks ``train.block_offload`` keeps off the GPU.
        fp8_matmuls: ``fp8`` only: quantize for float8 matmuls (True) or weight-only (False);
            None = where ``device`` has them (:func:`has_fp8_matmuls`).  Layers torchao cannot
            multiply in float8 (a weight that is not bf16, sides that are not multiples of 16)
            are stored weight-only.

    Raises:
        FlowtuneError: an unknown mode, or torchao is not installed.
    """
    check_quantize_available(mode)
    summary = QuantizeSummary(mode=mode)
    targets: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if matches_any(name, skip):
            summary.kept.append(name)
        elif mode == "nf4" and nf4_scaler_block_size(module.weight.numel()) is None:
            summary.unsupported.append(name)
        else:
            targets.append((name, module))
    summary.quantized = [name for name, _ in targets]
    if mode == "nf4":
        from torchao.quantization import to_nf4

        def quantize(name: str, module: nn.Linear) -> None:
            weight = module.weight.detach()
            scaler_block = nf4_scaler_block_size(weight.numel())
            module.weight = nn.Parameter(
                to_nf4(weight.contiguous(), NF4_BLOCK_SIZE, scaler_block), requires_grad=False
            )
    else:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()
        if mode == "fp8" and (has_fp8_matmuls(device) if fp8_matmuls is None else fp8_matmuls):
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

            matmul_config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        else:
            matmul_config = None

        def quantize(name: str, module: nn.Linear) -> None:
            if matmul_config is not None and module.weight.dtype == torch.bfloat16:
                quantize_(module, matmul_config)
            if hasattr(module.weight, "__tensor_flatten__"):
                summary.fp8_matmuls.append(name)
            else:  # weight-only, or a shape torchao's float8 matmul left unquantized
                quantize_(module, config)
            module.weight.requires_grad_(False)

    for name, module in targets:
        if device is not None:
            module.to(device)
        quantize(name, module)
        adopt(module)
        if device is not None and torch.device(device).type != "cpu" and matches_any(name, host):
            module.weight = nn.Parameter(
                map_tensor(module.weight.detach(), lambda t: t.to("cpu")), requires_grad=False
            )
            if module.bias is not None:
                module.bias.data = module.bias.data.to("cpu")
    return summary


def quantize_text_encoders(
    pipe: Any,
    mode: str,
    encoders: tuple[tuple[str, tuple[str, ...]], ...],
    device: torch.device | str | None = None,
) -> dict[str, QuantizeSummary]:
    """Quantize, in place, the frozen text encoders of a loaded pipeline (``model.encoder_quantize``).

    Args:
        pipe: A diffusers pipeline; components it was loaded without (None) are passed over.
        mode: ``int8``, ``fp8`` or ``nf4``.
        encoders: The family's ``encoder_quantize_skip``: ``(component, skip patterns)`` pairs.
        device: As for :func:`quantize_linears`.

    Returns:
        ``{component: summary}`` of the components quantized.

    Raises:
        FlowtuneError: an unknown mode, or torchao is not installed.
    """
    check_quantize_available(mode, "model.encoder_quantize")
    summaries: dict[str, QuantizeSummary] = {}
    for component, skip in encoders:
        module = getattr(pipe, component, None)
        if not isinstance(module, nn.Module):
            continue
        module.requires_grad_(False)
        summaries[component] = quantize_linears(module, mode, skip, device)
    return summaries


def exclude_quantized_from_ddp(model: nn.Module) -> list[str]:
    """Tell DDP not to broadcast ``model``'s quantized weights when it wraps it; returns their names.

    DDP copies every parameter and buffer of process 0 to the others when it starts, and torchao's
    tensor subclasses implement none of the ops its broadcast needs.  They need no copy: every
    process loads the same file and quantizes it the same way, and they are frozen, so DDP's
    gradient all-reduce never sees them either.  Call it after the LoRA is added (peft renames a
    wrapped layer's weight to ``...base_layer.weight``).
    """
    from torch.nn.parallel import DistributedDataParallel

    names = [
        name
        for name, param in model.named_parameters()
        if not param.requires_grad and type(param) not in (torch.Tensor, nn.Parameter)
    ]
    if names:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names
