"""Block offload for training (``train.block_offload``): most transformer blocks' frozen weights
live in (pinned) CPU memory and are copied to the GPU just before each block runs, forward and
backward, then dropped again; the last N blocks, everything outside the blocks (embedders,
final norm and projection) and every trainable (LoRA) weight stay on the GPU.

Why not diffusers' ``apply_group_offloading`` (diffusers 0.42.1, ``hooks/group_offloading.py``),
which was read for this: it is built for inference and does not serve training.

- It has no backward hooks: a block's weights are offloaded right after its forward and never
  brought back for its backward, which needs them (``grad_input = grad_output @ W``); the
  backward of an offloaded block would read CPU weights.  With gradient checkpointing the
  recomputation onloads the block but offloads it again at the end of the recomputed forward,
  before the block's backward runs.
- With ``use_stream=True`` every parameter of a group, trainable LoRA ones included, is
  restored on offload from a pinned CPU snapshot taken when the hooks were applied, so each
  optimizer update of a LoRA weight in an offloaded block would be thrown away.
- ``block_level`` offloads every block of every ``ModuleList`` and also the model's top-level
  layers (embedders, final projection: offloaded after the top-level forward, i.e. again before
  backward); it cannot keep N blocks resident.

So flowtune uses plain torch module hooks: a forward pre-hook onloads a block (and prefetches
the next one on a side CUDA stream), a forward hook drops it, a full backward pre-hook onloads
it again for its backward (and prefetches the block before it), and the end of the backward
pass drops the blocks whose backward is done.  Only frozen parameters move, by replacing their
``.data`` (the ``nn.Parameter`` objects stay the same), so the optimizer, peft and autograd keep
the tensors they hold; LoRA weights and their gradients stay on the GPU.  A checkpoint
recomputation inside the backward pass finds its block already onloaded and leaves it so.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowtune.errors import FlowtuneError
from flowtune.families import FamilySpec
from flowtune.memory.quantize import inner_tensors, map_tensor


def model_block_count(spec: FamilySpec, config: dict[str, Any]) -> int:
    """The number of transformer blocks of a model of family ``spec`` with transformer config
    ``config`` (its ``config.json``): the sum of ``spec.block_lists``' config keys."""
    return sum(int(config.get(key, 0)) for _, key in spec.block_lists)


def read_transformer_config(pretrained: str, revision: str | None) -> dict[str, Any] | None:
    """The ``transformer/config.json`` of ``model.pretrained`` (a local folder, or only that file
    fetched from the Hub: no weights), or None when it cannot be read here (the model's loading
    then says why)."""
    local = Path(pretrained).expanduser()
    try:
        if local.is_dir():
            return json.loads((local / "transformer" / "config.json").read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(
            Path(hf_hub_download(pretrained, "transformer/config.json", revision=revision)).read_text()
        )
    except Exception:  # noqa: BLE001 - missing, offline, gated: resolve_pretrained reports it in one line
        return None


def check_block_offload(
    spec: FamilySpec, pretrained: str, revision: str | None, resident: int, key: str = "train.block_offload"
) -> None:
    """Refuse ``train.block_offload: resident`` (or ``flowtune sample``'s ``key``
    ``--block-offload``) for ``model.pretrained`` when it keeps more blocks than the model has,
    from its transformer's ``config.json`` alone, before any weight is downloaded or loaded.

    Raises:
        FlowtuneError: the family declares no block lists, or ``resident`` exceeds the count.
    """
    option = key.startswith("--")
    off = "none" if option else "null"
    if not spec.block_lists:
        raise FlowtuneError(
            f"{key}: model family {spec.name!r} declares no transformer block lists; "
            + ("leave it out" if option else f"set {key}={off}")
        )
    config = read_transformer_config(pretrained, revision)
    if config is None:
        return
    count = model_block_count(spec, config)
    if resident > count:
        given = f"{key} {resident}" if option else f"{key}={resident}"
        raise FlowtuneError(
            f"{given} keeps more blocks on the GPU than the model has ({count}); "
            f"set it to 0-{count - 1} (the number of blocks kept on the GPU), or {off} to turn offload off"
        )


def offloaded_block_names(spec: FamilySpec, config: dict[str, Any], resident: int) -> list[str]:
    """Module names of the blocks ``train.block_offload: resident`` offloads (all but the last
    ``resident`` in forward order), e.g. ``transformer_blocks.0``, from the model's config."""
    names = [f"{attr}.{i}" for attr, key in spec.block_lists for i in range(int(config.get(key, 0)))]
    return names[: max(0, len(names) - resident)]


def quantized_host_blocks(
    spec: FamilySpec, model_dir: Path, quantize: str | None, resident: int | None
) -> list[str]:
    """The blocks whose layers go back to the CPU as soon as ``model.quantize`` has quantized
    them on the GPU (those ``train.block_offload: resident`` streams), so that the quantized
    model is never on the GPU whole; [] unless both are set."""
    if quantize is None or resident is None:
        return []
    return offloaded_block_names(spec, read_transformer_config(str(model_dir), None) or {}, resident)


def transformer_blocks(model: nn.Module, spec: FamilySpec) -> list[nn.Module]:
    """The transformer blocks of ``model`` in forward order: the modules of ``spec.block_lists``'
    ModuleLists, one list after the other."""
    return [block for name, _ in spec.block_lists for block in getattr(model, name)]


class _Weight:
    """One frozen weight of an offloaded block and its CPU copy.

    A plain parameter keeps its ``nn.Parameter`` object and only its ``.data`` changes, so
    autograd, which may have saved the parameter itself for the backward, finds the onloaded data
    there.  A quantized weight (a tensor subclass, whose ``.data`` cannot be swapped) is replaced
    in its module by a new frozen parameter: a quantized layer
    (:class:`~flowtune.memory.quantized_linear.QuantizedLinear`) reads its module's current
    weight in its forward, its checkpoint recomputation and its backward.
    """

    def __init__(self, module: nn.Module, name: str, stored: torch.Tensor) -> None:
        self.module = module
        self.name = name
        self.stored = stored
        self.quantized = hasattr(stored, "__tensor_flatten__")

    @property
    def current(self) -> torch.Tensor:
        return self.module._parameters[self.name]

    def point_at(self, tensor: torch.Tensor) -> None:
        if self.quantized:
            self.module._parameters[self.name] = nn.Parameter(tensor, requires_grad=False)
        else:
            self.current.data = tensor


class BlockOffload:
    """Stream the frozen weights of ``blocks`` between CPU and ``device`` around each block's
    forward and backward (see the module docstring).

    Args:
        blocks: The blocks to offload, in forward order (a model's others stay put).
        device: The compute device.  On CUDA the CPU copies are pinned and the next block is
            prefetched on a side stream while the current one computes; elsewhere copies are
            synchronous (on a CPU they cost nothing: the weights never leave).
        strict: An offloaded weight becomes an empty tensor instead of its CPU copy, so any
            computation that touches a weight while its block is offloaded fails (tests: proves
            on a CPU that every use of a weight, forward, backward and recomputation, happens
            while its block is onloaded).
    """

    def __init__(self, blocks: list[nn.Module], device: torch.device, *, strict: bool = False):
        self.blocks = blocks
        self.device = torch.device(device)
        self.strict = strict
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Per block: its frozen weights (trainable LoRA weights stay on the device).
        self.weights: list[list[_Weight]] = []
        self.onloaded: list[bool] = []
        self.ready: list[torch.cuda.Event | None] = []
        self.in_backward: set[int] = set()
        self.handles: list[Any] = []

    def install(self) -> BlockOffload:
        """Copy the offloaded weights to CPU memory, drop them from the device and register the
        hooks.  Call before the optimizer's first step and before Accelerate's ``prepare``
        (with ``device_placement=False`` for the model: see :func:`offload_blocks`)."""
        # Blocks take their tensors as keyword arguments, so torch's full backward hooks see no
        # inputs and warn; the pre-hook used here fires on the outputs' gradients as intended.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        pin = self.device.type == "cuda"
        for index, block in enumerate(self.blocks):
            weights = []
            for module in block.modules():
                for name, param in module._parameters.items():
                    if param is None or param.requires_grad:
                        continue  # trainable (LoRA): stays on the device, in the optimizer
                    stored = map_tensor(
                        param.detach(), lambda t: t.to("cpu").pin_memory() if pin else t.to("cpu")
                    )
                    weights.append(_Weight(module, name, stored))
            self.weights.append(weights)
            self.onloaded.append(True)
            self.ready.append(None)
            self._offload(index)
            self.handles += [
                block.register_forward_pre_hook(lambda m, a, i=index: self._pre_forward(i)),
                block.register_forward_hook(lambda m, a, o, i=index: self._post_forward(i)),
                block.register_full_backward_pre_hook(lambda m, g, i=index: self._pre_backward(i)),
            ]
        return self

    def remove(self) -> None:
        """Remove the hooks and put every offloaded weight back on the device."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for index in range(len(self.blocks)):
            self._onload(index, wait=True)

    # ---------------------------------------------------------------- hooks

    def _pre_forward(self, index: int) -> None:
        self._onload(index, wait=True)
        if index not in self.in_backward and index + 1 < len(self.blocks):
            self._onload(index + 1, wait=False)  # prefetch the next block

    def _post_forward(self, index: int) -> None:
        if index not in self.in_backward:  # not a checkpoint recomputation inside backward
            self._offload(index)

    def _pre_backward(self, index: int) -> None:
        if not self.in_backward:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        # Backward runs the blocks in reverse: those whose backward started earlier are done.
        for done in sorted(self.in_backward - {index}):
            self._offload(done)
        self.in_backward = {index}
        self._onload(index, wait=True)
        if index > 0:
            self._onload(index - 1, wait=False)  # prefetch the block before it

    def _end_backward(self) -> None:
        for index in sorted(self.in_backward):
            self._offload(index)
        self.in_backward = set()

    # ------------------------------------------------------------ transfers

    def _onload(self, index: int, *, wait: bool) -> None:
        """Copy block ``index``'s weights to the device (on the side stream on CUDA); with
        ``wait``, make the compute stream wait for the copy before using them."""
        if not self.onloaded[index]:
            if self.stream is None:
                for weight in self.weights[index]:
                    weight.point_at(map_tensor(weight.stored, lambda t: t.to(self.device)))
            else:
                with torch.cuda.stream(self.stream):
                    for weight in self.weights[index]:
                        weight.point_at(
                            map_tensor(weight.stored, lambda t: t.to(self.device, non_blocking=True))
                        )
                    event = torch.cuda.Event()
                    event.record(self.stream)
                self.ready[index] = event
            self.onloaded[index] = True
        event = self.ready[index]
        if wait and event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            # Allocated on the side stream, used on the compute stream: keep the memory until
            # the compute stream's work queued so far is done.
            for weight in self.weights[index]:
                for tensor in inner_tensors(weight.current.detach()):
                    tensor.record_stream(compute)
            self.ready[index] = None

    def _offload(self, index: int) -> None:
        """Drop block ``index``'s device copies: each weight points at its CPU copy again (or at
        an empty tensor when ``strict``)."""
        if not self.onloaded[index]:
            return
        for weight in self.weights[index]:
            if self.strict:
                empty = torch.empty(0, dtype=weight.current.dtype)
                if weight.quantized:
                    weight.module._parameters[weight.name] = nn.Parameter(empty, requires_grad=False)
                else:
                    weight.current.data = empty
            else:
                weight.point_at(weight.stored)
        self.onloaded[index] = False
        self.ready[index] = None


def offload_blocks(
    model: nn.Module, spec: FamilySpec, resident: int, device: torch.device, *, strict: bool = False
) -> BlockOffload:
    """Keep the last ``resident`` transformer blocks (in forward order) and everything outside
    the blocks on ``device``; offload the frozen weights of the others (:class:`BlockOffload`).
    The model comes in on the CPU; afterwards, everything it needs on ``device`` is there, so
    Accelerate must not move it (``prepare(..., device_placement=[False, ...])``).

    Args:
        model: The transformer, LoRA added, gradient checkpointing set, not yet prepared.
        spec: Its family (``spec.block_lists``).
        resident: ``train.block_offload``: how many blocks stay on the device (0 to the count).
        device: The compute device.
        strict: See :class:`BlockOffload`.

    Raises:
        FlowtuneError: more resident blocks than the model has.
    """
    blocks = transformer_blocks(model, spec)
    if not 0 <= resident <= len(blocks):
        raise FlowtuneError(
            f"train.block_offload={resident}: the model has {len(blocks)} blocks; set it to 0-{len(blocks)}"
        )
    offloaded = blocks[: len(blocks) - resident]
    moving = {id(p) for block in offloaded for p in block.parameters() if not p.requires_grad}
    _move(model, device, {(id(m), n) for m, n, p in _parameters(model) if id(p) in moving})
    # DDP would broadcast every parameter from rank 0 at wrapping time; the offloaded ones are
    # frozen, identical on every rank and on the CPU, so it skips them.
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = ignored + [  # type: ignore[assignment]
        name for name, p in model.named_parameters() if id(p) in moving and name not in ignored
    ]
    hooks = BlockOffload(offloaded, device, strict=strict).install()
    # Marks the model for flowtune.encoders.base.load_pipeline (validation images), which then
    # leaves it where it is instead of moving every weight to the device.
    model.flowtune_block_offload = hooks  # type: ignore[assignment]
    return hooks


def _parameters(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(module, name, parameter) of every parameter of ``model``, each module's own."""
    return [(m, n, p) for m in model.modules() for n, p in m._parameters.items() if p is not None]


def _move(model: nn.Module, device: torch.device | str, kept: set[tuple[int, str]]) -> None:
    """Move ``model``'s parameters and buffers to ``device``, but the parameters ``kept`` names
    (``(id(module), name)``) where they are; quantized ones (tensor subclasses, whose ``.data``
    cannot be swapped) are replaced in their modules by moved copies."""
    device = torch.device(device)
    for module, name, param in _parameters(model):
        if (id(module), name) in kept or param.device == device:
            continue
        if hasattr(param, "__tensor_flatten__"):
            moved = map_tensor(param.detach(), lambda t: t.to(device))
            module._parameters[name] = nn.Parameter(moved, requires_grad=param.requires_grad)
        else:
            param.data = param.data.to(device)
    for buffer in model.buffers():
        buffer.data = buffer.data.to(device)


def move_resident(model: nn.Module, device: torch.device | str) -> None:
    """Move what ``model`` keeps on its compute device to ``device`` (a frozen model parked in
    CPU memory between uses, and back): under :func:`offload_blocks`, everything but the
    streamed blocks' frozen weights, which stay with their hooks (all offloaded: call it between
    forwards); without block offload, the whole model."""
    _move(model, device, streamed_weights(model))


def streamed_weights(model: nn.Module) -> set[tuple[int, str]]:
    """``(id(module), name)`` of the frozen weights :func:`offload_blocks` streams in ``model``
    (empty without block offload): those :func:`move_resident` leaves alone."""
    hooks = getattr(model, "flowtune_block_offload", None)
    return {(id(w.module), w.name) for block in (hooks.weights if hooks else []) for w in block}
