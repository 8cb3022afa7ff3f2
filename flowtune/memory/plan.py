"""``flowtune plan``: the peak memory of one training step, predicted without any weights.

The model is built from its ``transformer/config.json`` alone (a local model folder's, or one
bundled in :mod:`flowtune.memory.configs` for the Hub ids the bundled recipes name) under torch's
:class:`~torch._subclasses.fake_tensor.FakeTensorMode`: every tensor has a shape, a dtype and a
storage size but no data, so building a 32B transformer and running a training step on it costs
seconds and no memory.  The step is the trainer's own: the family adapter's example batch at the
recipe's largest bucket and ``train.batch_size``, ``FlowMatchingPipeline.step`` (the adapter's
forward, the loss), backward, gradient clipping, the optimizer step.  :class:`LiveBytes`, a
``TorchDispatchMode``, counts the bytes of every storage alive while that runs and keeps the
peak, which is what a caching-free allocator would need; so a new family gets a plan from its
adapter's :meth:`~flowtune.flow_matching.adapters.base.ModelAdapter.example_batch` alone.

Two savers cannot run on fake tensors and are accounted from the traced model instead:

- ``model.quantize``: torchao's tensor subclasses do not build on fake tensors.  The frozen
  linear weights the family quantizes are replaced in the sum by their quantized size
  (:func:`quantized_bytes`), plus one layer's weight dequantized during its matmul.
- ``train.block_offload: N``: the frozen weights of all but the last N blocks leave the GPU;
  two of them (the running block and the prefetched one) are on it at a time.

Not counted: the CUDA caching allocator's rounding and fragmentation, the CUDA context (about
0.5 GB per process), cuBLAS/attention workspaces, and the data loader's pinned host buffers.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flowtune.errors import FlowtuneError
from flowtune.families import FamilySpec

GIB = 1024**3


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages that torch operators create and that are still
    alive (fake or real tensors alike); ``current`` and ``peak`` are in bytes.

    Each storage is counted once, when an operator first returns a tensor viewing it, and
    uncounted when it is freed (a weak reference's callback).  Storages made before the mode was
    entered are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def reset_peak(self) -> None:
        """Start a new peak from the bytes alive now."""
        self.peak = self.current

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()

        def freed(_ref: weakref.ref, key: int = key, nbytes: int = nbytes) -> None:
            if self._live.pop(key, None) is not None:
                self.current -= nbytes

        self._live[key] = weakref.ref(storage, freed)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and not leaf.is_meta:
                self._count(leaf)
        return out


@dataclass
class StepPlan:
    """The predicted memory of one training step (bytes, except where named).

    Attributes:
        weights: The frozen transformer weights as stored (quantized where ``quantize`` says).
        lora: The trainable weights (float32).
        gradients: Their gradients (float32).
        optimizer: The optimizer's states.
        activations: What the forward keeps for the backward and the backward's temporaries at
            the step's peak (peak - weights - trainable - gradients - optimizer).
        offload_saved: What ``train.block_offload`` takes off the GPU (0 without it).
        peak: The step's peak: weights + trainable + gradients + optimizer + activations -
            offload_saved.
        settings: What the plan assumed, as (name, value) lines for the table.
    """

    weights: int
    lora: int
    gradients: int
    optimizer: int
    activations: int
    offload_saved: int
    peak: int
    settings: list[tuple[str, str]] = field(default_factory=list)

    def fits(self, gpu_gib: float) -> bool:
        """Whether the peak fits a GPU of ``gpu_gib`` GiB (without its CUDA context's share)."""
        return self.peak <= gpu_gib * GIB

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: bytes as ints, settings as a mapping."""
        data = asdict(self)
        data["settings"] = dict(self.settings)
        return data


def bundled_config_path(pretrained: str) -> Path | None:
    """The bundled ``config.json`` for Hub id ``pretrained`` (``owner/name``), or None."""
    name = pretrained.replace("/", "__") + ".json"
    path = resources.files("flowtune.memory") / "configs" / name
    return Path(str(path)) if path.is_file() else None


def load_transformer_config(pretrained: str) -> tuple[dict[str, Any], str]:
    """The transformer config of ``model.pretrained`` and where it came from, without any
    download: a local folder's ``transformer/config.json``, else the bundled one.

    Raises:
        FlowtuneError: neither exists (names what to do).
    """
    local = Path(pretrained).expanduser()
    if local.is_dir():
        path = local / "transformer" / "config.json"
        if not path.is_file():
            raise FlowtuneError(
                f"model.pretrained {pretrained} has no transformer/config.json; give a diffusers model folder"
            )
    else:
        bundled = bundled_config_path(pretrained)
        if bundled is None:
            raise FlowtuneError(
                f"flowtune plan has no config for model.pretrained {pretrained!r}; download its "
                "transformer/config.json into DIR/transformer/ and set model.pretrained=DIR"
            )
        path = bundled
    try:
        return json.loads(path.read_text()), "bundled" if path == bundled_config_path(pretrained) else str(
            path
        )
    except (OSError, json.JSONDecodeError) as exc:
        raise FlowtuneError(f"{path} is not a readable config.json ({exc})") from None


def quantized_bytes(shape: torch.Size, mode: str) -> int:
    """Bytes of a linear weight [out_features, in_features] stored by ``model.quantize=mode``:
    int8 and fp8 keep one byte per weight plus a 2-byte (int8) or 4-byte (fp8) scale per output
    row; nf4 keeps half a byte per weight, an int8 scale per 64 weights and a float32 scale per
    256 of those (torchao's NF4Tensor with flowtune's block sizes)."""
    from flowtune.memory.quantize import NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE

    numel = shape.numel()
    if mode == "int8":
        return numel + 2 * shape[0]
    if mode == "fp8":
        return numel + 4 * shape[0]
    blocks = numel // NF4_BLOCK_SIZE
    return numel // 2 + blocks + 4 * max(1, blocks // NF4_SCALER_BLOCK_SIZE)


def largest_bucket(resolutions: list[int], granularity: int, step: int | None) -> tuple[int, int]:
    """(width, height) of the bucket with the most pixels among those of every resolution."""
    from flowtune.data.buckets import make_buckets

    buckets = [b for r in resolutions for b in make_buckets(r, granularity, step=step)]
    best = max(buckets, key=lambda b: (b.area, -abs(b.width - b.height)))
    return best.width, best.height


def _build_fake_model(spec: FamilySpec, config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The family's transformer from ``config`` in ``dtype`` (built in it: fake modules cannot
    be moved with ``.to()``), frozen, in train mode."""
    import diffusers

    cls = getattr(diffusers, spec.transformer_class)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    model.train()
    return model


def trace_training_step(
    recipe: Any, spec: FamilySpec, config: dict[str, Any], *, fake: bool = True
) -> tuple[nn.Module, dict[str, int]]:
    """Build the recipe's model from ``config`` and run one training step on it, counting live
    bytes with :class:`LiveBytes`.

    Args:
        recipe: The resolved recipe (``model``, ``lora``, ``data``, ``train``, ``flow``,
            ``optimizer``).
        fake: Trace on fake tensors (the plan); False runs it on real CPU tensors (how the
            plan's tests measure it).

    Returns:
        The model (LoRA added) and byte counts: ``frozen``, ``trainable``, ``gradients``,
        ``optimizer``, ``peak``.
    """
    from omegaconf import OmegaConf

    from flowtune.flow_matching import create_pipeline
    from flowtune.train.model import add_lora
    from flowtune.train.optim import build_optimizer

    if recipe.train.mode != "lora":
        raise FlowtuneError("flowtune plan covers train.mode=lora only for now; set train.mode=lora")
    dtype = getattr(torch, recipe.model.dtype)
    resolutions = (
        list(recipe.data.resolution)
        if isinstance(recipe.data.resolution, list | tuple)
        else [recipe.data.resolution]
    )
    resolutions = [int(r) for r in resolutions]
    width, height = largest_bucket(resolutions, spec.spatial_granularity, recipe.data.bucket_step)
    references = 1 if spec.reference_images and spec.uses_edit_pairs(recipe.data.edit_pairs) else 0
    flow = create_pipeline(
        spec.adapter, OmegaConf.to_container(recipe.model.adapter), **OmegaConf.to_container(recipe.flow)
    )
    optimizer_cfg = recipe.optimizer
    if optimizer_cfg.name != "adamw":  # optional packages' optimizers do not run on fake tensors
        optimizer_cfg = OmegaConf.merge(optimizer_cfg, {"name": "adamw"})

    fake_mode = None
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode()
        fake_mode.__enter__()
    tracker = LiveBytes()
    try:
        with tracker:
            model = _build_fake_model(spec, config, dtype)
            frozen = tracker.current
            # peft moves each new LoRA layer to its base layer's device and dtype with
            # Module.to(), which fake modules refuse; they are made on the CPU already, and
            # add_lora casts them to float32 as training does.
            with mock.patch.object(nn.Module, "to", lambda self, *a, **k: self):
                params = add_lora(
                    model,
                    spec,
                    rank=recipe.lora.rank,
                    alpha=recipe.lora.alpha,
                    dropout=recipe.lora.dropout,
                    target_modules=list(recipe.lora.target_modules) if recipe.lora.target_modules else None,
                )
            trainable = sum(p.untyped_storage().nbytes() for p in params)
            if recipe.train.gradient_checkpointing:
                model.enable_gradient_checkpointing()
            optimizer = build_optimizer(params, optimizer_cfg)
            adapter = flow.model_adapter
            batch = adapter.example_batch(
                config, recipe.train.batch_size, height, width, recipe.data.max_sequence_length, references
            )
            max_norm = recipe.train.max_grad_norm if recipe.train.max_grad_norm > 0 else float("inf")
            # Two steps: the optimizer makes its states in the first; the second is every
            # later step (states alive throughout), and its peak is the plan's.
            for _ in range(2):
                tracker.reset_peak()
                _, loss, _, _ = flow.step(
                    model, batch, device="cpu", dtype=dtype, collect_metrics=False, check_loss=False
                )
                loss.backward()
                del loss
                gradients = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
                torch.nn.utils.clip_grad_norm_(params, max_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            states = sum(
                t.untyped_storage().nbytes()
                for state in optimizer.state.values()
                for t in state.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0
            )
            del batch
    finally:
        if fake_mode is not None:
            fake_mode.__exit__(None, None, None)
    counts = {
        "frozen": frozen,
        "trainable": trainable,
        "gradients": gradients,
        "optimizer": states,
        "peak": tracker.peak,
        "width": width,
        "height": height,
        "references": references,
    }
    return model, counts


def _frozen_linears(model: nn.Module, spec: FamilySpec) -> list[tuple[str, nn.Linear]]:
    """The frozen linear layers ``model.quantize`` quantizes (peft's base layers included)."""
    from flowtune.memory.quantize import matches_any

    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            clean = name.replace(".base_layer", "")
            if ".lora_" not in name and not matches_any(clean, spec.quantize_skip):
                found.append((clean, module))
    return found


def plan_training_step(recipe: Any, spec: FamilySpec) -> StepPlan:
    """The predicted peak memory of one training step of ``recipe`` (see the module docstring).

    Raises:
        FlowtuneError: no config for ``model.pretrained``, an adapter without an example batch,
            or a recipe the plan does not cover.
    """
    config, source = load_transformer_config(recipe.model.pretrained)
    try:
        model, counts = trace_training_step(recipe, spec, config)
    except NotImplementedError:
        raise FlowtuneError(f"flowtune plan does not cover model family {spec.name!r} yet") from None
    return plan_from_trace(recipe, spec, model, counts, source)


def plan_from_trace(
    recipe: Any, spec: FamilySpec, model: nn.Module, counts: dict[str, int], source: str
) -> StepPlan:
    """The plan from a traced step (:func:`trace_training_step`) and the savers that do not
    change the trace: ``model.quantize`` and ``train.block_offload`` (see the module docstring)."""
    from flowtune.console import format_bytes

    weights = counts["frozen"]
    extra_transient = 0
    mode = recipe.model.quantize
    linears = _frozen_linears(model, spec)
    if mode is not None:
        full = sum(m.weight.untyped_storage().nbytes() for _, m in linears)
        weights += sum(quantized_bytes(m.weight.shape, mode) for _, m in linears) - full
        extra_transient = max((m.weight.untyped_storage().nbytes() for _, m in linears), default=0)

    offload_saved = 0
    resident = recipe.train.block_offload
    if resident is not None:
        quantized = {id(m) for _, m in linears} if mode is not None else set()
        blocks = [b for attr, _ in spec.block_lists for b in getattr(model, attr, [])]
        if resident > len(blocks):
            raise FlowtuneError(
                f"train.block_offload={resident} keeps more blocks than the model has ({len(blocks)}); lower it"
            )
        sizes = []
        for block in blocks[: len(blocks) - resident]:
            size = 0
            for module in block.modules():
                for param in module.parameters(recurse=False):
                    if param.requires_grad:
                        continue
                    is_q = id(module) in quantized and param is module.weight
                    size += quantized_bytes(param.shape, mode) if is_q else param.untyped_storage().nbytes()
            sizes.append(size)
        if sizes:
            offload_saved = max(0, sum(sizes) - 2 * max(sizes))

    static = counts["frozen"] + counts["trainable"]
    activations = counts["peak"] - static - counts["gradients"] - counts["optimizer"] + extra_transient
    peak = (
        weights
        + counts["trainable"]
        + counts["gradients"]
        + counts["optimizer"]
        + activations
        - offload_saved
    )
    settings = [
        ("model", f"{recipe.model.pretrained} ({spec.transformer_class}, config {source})"),
        ("weights", f"{recipe.model.dtype}" + (f", {mode} linears" if mode else "")),
        (
            "step",
            f"batch {recipe.train.batch_size} at {counts['width']}x{counts['height']} px, "
            f"{recipe.data.max_sequence_length} text tokens"
            + (f", {counts['references']} reference image" if counts["references"] else ""),
        ),
        ("gradient checkpointing", "on" if recipe.train.gradient_checkpointing else "off"),
        ("LoRA", f"rank {recipe.lora.rank}, float32"),
        (
            "optimizer",
            "AdamW (float32 states)"
            if recipe.optimizer.name == "adamw"
            else f"{recipe.optimizer.name}: planned as AdamW's float32 states (an upper bound)",
        ),
        ("block offload", "off" if resident is None else f"{resident} blocks resident"),
    ]
    if mode is not None:
        settings.append((f"frozen weights without {mode}", format_bytes(counts["frozen"])))
    return StepPlan(
        weights=weights,
        lora=counts["trainable"],
        gradients=counts["gradients"],
        optimizer=counts["optimizer"],
        activations=activations,
        offload_saved=offload_saved,
        peak=peak,
        settings=settings,
    )
