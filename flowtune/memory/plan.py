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
  (:func:`quantized_bytes`), plus the temporaries of dequantizing one slice of a weight
  (:func:`dequantization_bytes`), added at the moments of the trace where each layer
  dequantizes (:class:`LinearMoments`).
- ``train.block_offload: N``: the frozen weights of all but the last N blocks leave the GPU;
  two of them (the running block and the prefetched one) are on it at a time.

``train.activation_offload`` changes what the step keeps, so it is traced: the trainer's
saved-tensor hooks run in the trace, simulating their copies (no data), so the large saved
activations leave the count as the forward saves them and come back, one block's inputs at a
time, when the backward unpacks them; the most bytes they held on the host at once is the pinned
CPU memory the step needs (``StepPlan.host_activations``).

Not counted: the CUDA caching allocator's rounding and fragmentation, the CUDA context (about
0.5 GB per process), cuBLAS/attention workspaces, and the data loader's pinned host buffers.
"""

from __future__ import annotations

import copy
import json
import weakref
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
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
        if hasattr(tensor, "__tensor_flatten__"):
            # A wrapper subclass (torchao's quantized weights): its own storage is a logical,
            # full-size one that holds nothing; the bytes are in its inner tensors.
            from flowtune.memory.quantize import inner_tensors

            for inner in inner_tensors(tensor):
                self._count(inner)
            return
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
            the step's peak (peak - weights - trainable - gradients - optimizer), on the GPU:
            with ``train.activation_offload``, those in CPU memory are not in it, and the
            inputs of the block being recomputed, back on the GPU, are.
        offload_saved: What ``train.block_offload`` takes off the GPU (0 without it).
        offloaded: The frozen weights of the blocks ``train.block_offload`` streams, all in CPU
            memory (0 without it); ``offload_saved`` is less the two blocks in flight.
        peak: The step's peak: weights + trainable + gradients + optimizer + activations -
            offload_saved.
        host_activations: With ``train.activation_offload``, the most bytes of saved
            activations in (pinned) CPU memory at once; 0 without it.
        settings: What the plan assumed, as (name, value) lines for the table.
    """

    weights: int
    lora: int
    gradients: int
    optimizer: int
    activations: int
    offload_saved: int
    peak: int
    host_activations: int = 0
    settings: list[tuple[str, str]] = field(default_factory=list)
    offloaded: int = 0

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


def frozen_linears(model: nn.Module, spec: FamilySpec) -> list[tuple[str, nn.Linear]]:
    """The frozen linear layers ``model.quantize`` quantizes (peft's base layers included)."""
    from flowtune.memory.quantize import matches_any

    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            clean = name.replace(".base_layer", "")
            if ".lora_" not in name and not matches_any(clean, spec.quantize_skip):
                found.append((clean, module))
    return found


def dequantization_bytes(weight: torch.Tensor, mode: str) -> int:
    """Bytes of the temporaries of dequantizing one slice of ``weight`` [out_features,
    in_features] once ``model.quantize=mode`` stores it (:mod:`flowtune.memory.quantized_linear`
    dequantizes one slice at a time and keeps no dequantized copy for the backward); 0 for a
    weight the mode cannot store (kept in ``model.dtype``)."""
    from flowtune.memory import quantized_linear
    from flowtune.memory.quantize import NF4_BLOCK_SIZE, nf4_scaler_block_size

    rows, cols = weight.shape
    blocks = None
    if mode == "nf4":
        scaler = nf4_scaler_block_size(rows * cols)
        if scaler is None:
            return 0
        blocks = rows * cols // NF4_BLOCK_SIZE // scaler
    per_weight = quantized_linear.DEQUANTIZE_BYTES_PER_WEIGHT[mode][4 if weight.element_size() >= 4 else 2]
    return quantized_linear.slice_rows(rows, cols, blocks, quantized_linear.CHUNK_WEIGHTS) * cols * per_weight


class LinearMoments:
    """Records, for each frozen linear that ``model.quantize`` would quantize, the most bytes
    alive in the traced training steps at the two moments its quantized version dequantizes
    slices of its weight: right after its forward (its output made) and when its output's
    gradient arrives (plus its input's gradient, which it makes then).  A quantized plan adds
    each layer's dequantization temporaries at its own moments instead of at the step's peak.

    Args:
        tracker: The trace's :class:`LiveBytes`.
    """

    def __init__(self, spec: FamilySpec, tracker: LiveBytes) -> None:
        self.spec = spec
        self.tracker = tracker
        self.live: dict[str, int] = {}
        self.recording = True

    def _note(self, name: str, live: int) -> None:
        if self.recording:
            self.live[name] = max(self.live.get(name, 0), live)

    def install(self, model: nn.Module) -> None:
        """Register the hooks (they stay: the model is thrown away after the trace)."""
        for name, module in frozen_linears(model, self.spec):

            def after(_module: nn.Module, args: tuple, output: Any, name: str = name) -> None:
                self._note(name, self.tracker.current)
                if isinstance(output, torch.Tensor) and output.requires_grad:
                    grad_input = args[0].numel() * args[0].element_size()
                    output.register_hook(
                        lambda _grad: self._note(name, self.tracker.current + grad_input)  # noqa: B023
                    )

            module.register_forward_hook(after)


@dataclass
class Trace:
    """A recipe's training step traced on fake tensors, from which the plans of the savers that
    do not change the trace (``model.quantize``, ``train.block_offload``) are derived."""

    model: nn.Module
    counts: dict[str, int]
    source: str
    linear_moments: dict[str, int]
    """:class:`LinearMoments`' bytes alive at each quantizable linear's dequantizations."""
    training_static: int = 0
    """Bytes alive between training steps (frozen weights, LoRA, optimizer states)."""
    sampling_peak: int = 0
    """The peak of one no-grad denoising forward at the validation size, on top of that."""

    def plan(self, recipe: Any, spec: FamilySpec) -> StepPlan:
        """The plan of ``recipe`` (the traced one, or one that differs only in those savers)."""
        return plan_from_trace(recipe, spec, self.model, self.counts, self.source, self.linear_moments)


def trace_recipe(recipe: Any, spec: FamilySpec) -> Trace:
    """Trace one training step of ``recipe`` on fake tensors (see the module docstring).

    Raises:
        FlowtuneError: no config for ``model.pretrained``, an adapter without an example batch,
            or a recipe the plan does not cover.
    """
    from flowtune.memory.steps import run_training_steps, validation_frames

    config, source = load_transformer_config(recipe.model.pretrained)
    tracker = LiveBytes()
    moments = LinearMoments(spec, tracker)
    sampling: dict[str, int] = {}

    def sample_forward(model: nn.Module, flow: Any, autocast: Any) -> None:
        """One denoising forward at the validation size, batch 1, no gradients."""
        moments.recording = False
        sampling["static"] = tracker.current
        references = 1 if spec.reference_images and spec.uses_edit_pairs(recipe.data.edit_pairs) else 0
        batch = flow.model_adapter.example_batch(
            config,
            1,
            int(recipe.validation.height),
            int(recipe.validation.width),
            recipe.data.max_sequence_length,
            references,
            frames=validation_frames(recipe, spec),
        )
        tracker.reset_peak()
        with torch.no_grad(), autocast:
            flow.step(
                model,
                batch,
                device="cpu",
                dtype=getattr(torch, recipe.model.dtype),
                collect_metrics=False,
                check_loss=False,
            )
        sampling["peak"] = tracker.peak

    try:
        run = run_training_steps(
            recipe,
            spec,
            config,
            fake=True,
            tracker=tracker,
            on_model=moments.install,
            after_steps=sample_forward,
        )
    except NotImplementedError:
        raise FlowtuneError(f"flowtune plan does not cover model family {spec.name!r} yet") from None
    except (DataDependentOutputException, DynamicOutputShapeException):
        # The transformer's forward branches on tensor values or makes value-dependent shapes
        # (e.g. tokens reordered by their masks), which a trace on fake tensors cannot follow.
        raise FlowtuneError(
            f"flowtune plan cannot trace the {spec.transformer_class} of model family {spec.name!r}: "
            "its forward depends on the values of its inputs; the family's recipe comments give "
            "its memory figures"
        ) from None
    return Trace(
        run.model,
        run.counts(),
        source,
        moments.live,
        sampling["static"],
        sampling["peak"] - sampling["static"],
    )


def plan_training_step(recipe: Any, spec: FamilySpec) -> StepPlan:
    """The predicted peak memory of one training step of ``recipe`` (see the module docstring).

    Raises:
        FlowtuneError: as :func:`trace_recipe`.
    """
    return trace_recipe(recipe, spec).plan(recipe, spec)


@dataclass
class FitChange:
    """A recipe change that brings the plan under a GPU's memory.

    Attributes:
        overrides: ``key=value`` overrides.
        peak: The planned peak with them (bytes).
        cost: What it costs, from the measurements in docs/performance.md.
    """

    overrides: list[str]
    peak: int
    cost: str


# Savers in order of cost, from scripts/bench_memory.py's measurements on an H200
# (docs/performance.md "Memory savers"): s/step against the bf16 base at 1024 px.
OFFLOAD_COST = (
    "streams the other blocks' weights from CPU memory (+1% to +15% s/step measured; slower PCIe costs more)"
)
QUANTIZE_COSTS = {
    "fp8": "8-bit float weights (+34% s/step measured on FLUX.1-dev weight-only; float8 matmuls not measured yet)",
    "int8": "8-bit integer weights (+33% to +57% s/step measured)",
    "nf4": "4-bit weights, the largest rounding (+72% to +93% s/step measured)",
}


def _with(recipe: Any, overrides: list[str]) -> Any:
    from omegaconf import OmegaConf

    changed = copy.deepcopy(recipe)
    for override in overrides:
        key, value = override.split("=", 1)
        parsed = {"null": None, "true": True, "false": False}.get(value, value)
        OmegaConf.update(changed, key, int(value) if value.isdigit() else parsed)
    return changed


ACTIVATION_OFFLOAD = "train.activation_offload=true"


def changes_to_fit(
    recipe: Any, spec: FamilySpec, trace: Trace, budget: int, limit: int = 3
) -> list[FitChange]:
    """Up to ``limit`` recipe changes, cheapest first, whose plan fits ``budget`` bytes: block
    offload with as many blocks resident as fit, then each quantization mode the recipe does not
    already go beyond, alone and then with block offload.  When none fits, the same with
    ``train.activation_offload`` on (traced once more, only then).

    Only changes the recipe allows are offered: a quantized base and block offload need LoRA
    (the plan covers nothing else); block offload is not for FSDP2 nor families without blocks;
    activation offload needs gradient checkpointing and is not for FSDP2.
    """
    from flowtune.console import format_bytes

    found = _changes_within(recipe, spec, trace, budget, limit, [], "")
    train = recipe.train
    if found or train.activation_offload or not train.gradient_checkpointing or train.distributed == "fsdp":
        return found
    offloaded = _with(recipe, [ACTIVATION_OFFLOAD])
    trace = trace_recipe(offloaded, spec)
    host = trace.counts.get("host_activations", 0)
    cost = (
        f"the checkpointed activations in pinned CPU memory ({format_bytes(host)} of RAM, "
        "copied out and back once a step)"
    )
    change = FitChange([ACTIVATION_OFFLOAD], trace.plan(offloaded, spec).peak, cost)
    if change.peak <= budget:
        return [change]
    return _changes_within(offloaded, spec, trace, budget, limit, [ACTIVATION_OFFLOAD], cost)


def _changes_within(
    recipe: Any, spec: FamilySpec, trace: Trace, budget: int, limit: int, base: list[str], base_cost: str
) -> list[FitChange]:
    """:func:`changes_to_fit`'s block offload and quantization changes of ``recipe`` (traced as
    ``trace``), each after the ``base`` overrides and costing ``base_cost`` too."""
    modes = list(QUANTIZE_COSTS)
    current = recipe.model.quantize
    if current is not None:
        modes = modes[modes.index(current) + 1 :] if current in modes else []
    offload_ok = bool(spec.block_lists) and recipe.train.distributed != "fsdp"
    blocks = sum(len(getattr(trace.model, attr, [])) for attr, _ in spec.block_lists)
    resident_now = recipe.train.block_offload

    def offload(overrides: list[str]) -> FitChange | None:
        # Fewer resident blocks never need more memory: the most that fit is the cheapest.
        top = blocks if resident_now is None else resident_now - 1
        for resident in range(top, -1, -1):
            changed = [*overrides, f"train.block_offload={resident}"]
            peak = trace.plan(_with(recipe, changed), spec).peak
            if peak <= budget:
                return FitChange(changed, peak, "")
        return None

    found: list[FitChange] = []
    if offload_ok:
        change = offload([])
        if change is not None:
            change.cost = (
                f"keeps {change.overrides[-1].split('=')[1]} of {blocks} blocks on the GPU and "
                + OFFLOAD_COST
            )
            found.append(change)
    for mode in modes:
        if len(found) >= limit:
            break
        overrides = [f"model.quantize={mode}"]
        peak = trace.plan(_with(recipe, overrides), spec).peak
        if peak <= budget:
            found.append(FitChange(overrides, peak, QUANTIZE_COSTS[mode]))
        elif offload_ok:
            change = offload(overrides)
            if change is not None:
                resident = change.overrides[-1].split("=")[1]
                change.cost = f"{QUANTIZE_COSTS[mode]}, {resident} of {blocks} blocks on the GPU"
                found.append(change)
    for change in found:
        change.overrides = [*base, *change.overrides]
        change.cost = "; ".join(filter(None, [base_cost, change.cost]))
    return found[:limit]


def plan_from_trace(
    recipe: Any,
    spec: FamilySpec,
    model: nn.Module,
    counts: dict[str, int],
    source: str,
    linear_moments: dict[str, int] | None = None,
) -> StepPlan:
    """The plan from a traced step (:func:`~flowtune.memory.steps.run_training_steps`) and the
    savers that do not change the trace: ``model.quantize`` and ``train.block_offload`` (see
    the module docstring).

    Args:
        linear_moments: :class:`LinearMoments`' record of the trace; None = every quantized
            layer's dequantization is counted at the step's peak (an upper bound).
    """
    from flowtune.console import format_bytes

    weights = counts["frozen"]
    extra_transient = 0
    mode = recipe.model.quantize
    linears = frozen_linears(model, spec)
    if mode is not None:
        full = sum(m.weight.untyped_storage().nbytes() for _, m in linears)
        weights += sum(quantized_bytes(m.weight.shape, mode) for _, m in linears) - full
        moments = linear_moments or {}
        at_peak = max(
            (moments.get(name, counts["peak"]) + dequantization_bytes(m.weight, mode) for name, m in linears),
            default=0,
        )
        extra_transient = max(0, at_peak - counts["peak"])

    offload_saved = offloaded = 0
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
            offloaded = sum(sizes)
            offload_saved = max(0, offloaded - 2 * max(sizes))

    static = counts["frozen"] + counts["trainable"]
    activations = counts["peak"] - static - counts["gradients"] - counts["optimizer"] + extra_transient
    # model.expert=both (flowtune.train.experts): a second transformer of the same shapes stays on
    # the GPU with its LoRA and optimizer states; a step's gradients are one expert's.
    experts = 2 if recipe.model.expert == "both" else 1
    weights *= experts
    trainable, optimizer = counts["trainable"] * experts, counts["optimizer"] * experts
    peak = weights + trainable + counts["gradients"] + optimizer + activations - offload_saved
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
        (
            "activation offload",
            f"on: {format_bytes(counts.get('host_activations', 0))} of saved activations in pinned CPU memory"
            if recipe.train.activation_offload
            else "off",
        ),
    ]
    if experts > 1:
        settings.append(("experts", "both on the GPU (model.expert=both), each with its LoRA"))
    if mode is not None:
        settings.append((f"frozen weights without {mode}", format_bytes(counts["frozen"])))
    return StepPlan(
        weights=weights,
        lora=trainable,
        gradients=counts["gradients"],
        optimizer=optimizer,
        activations=activations,
        offload_saved=offload_saved,
        peak=peak,
        host_activations=counts.get("host_activations", 0),
        settings=settings,
        offloaded=offloaded,
    )
