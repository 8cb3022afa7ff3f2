"""Activation offload for training (``train.activation_offload``): the large tensors autograd
saves for the backward pass go to pinned CPU memory during the forward and come back to the GPU
when the backward needs them.

With gradient checkpointing (which it requires), what the forward keeps for the backward is
mostly each checkpointed transformer block's inputs: torch's non-reentrant checkpoint
(``torch.utils.checkpoint``, what diffusers' ``enable_gradient_checkpointing`` uses) saves them
as saved tensors of the *enclosing* graph, so an enclosing
:class:`torch.autograd.graph.saved_tensors_hooks` sees them, while what a block saves inside its
own forward goes to the checkpoint's own (innermost) hooks and is recomputed as before.  For a
video model these inputs dominate: Wan 2.1 14B at 81 frames of 480x832 keeps 40 blocks x 34k
tokens x 5120 x 2 bytes, 13 GiB.  The same hooks also take what the layers outside the blocks
save (the final norm and projection's inputs).

This is torch's own :func:`torch.autograd.graph.save_on_cpu` with three differences:

- Only large tensors move (:data:`MIN_BYTES` and up).  Small ones (timestep embeddings,
  modulation vectors) stay on the GPU: copying them costs more than it saves.
- Parameters and views of parameters stay (a frozen linear's weight saved for its input's
  gradient, LoRA weights): they are on the GPU anyway (or are block offload's to manage), so a
  CPU copy would only add bytes.  So do tensor subclasses (quantized weights, DTensors).
- A tensor saved several times (the text states every block takes) is copied to the CPU once.

On CUDA the device-to-host copy runs on a side stream into pinned memory (torch's caching host
allocator), so it overlaps the next block's forward; the GPU tensor is kept by the allocator
until that copy is done (``record_stream``).  The copy back is issued on the compute stream,
non-blocking, when the backward unpacks the tensor (a block's recomputation), after the
device-to-host copy's event: the recomputation needs it at once, so there is nothing to overlap
it with, and only the block being recomputed has its inputs back on the GPU.

Off CUDA (the CPU tests) the "host" copy is a copy on the same device: the mechanism, pack and
unpack, runs in full.  ``simulate=True`` (``flowtune plan``, on fake tensors) keeps no data:
packing records the shape and the bytes a host copy would hold, unpacking makes a new tensor of
that shape, so the trace counts the GPU memory the real hooks leave and :attr:`host_peak` the
pinned memory they need.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MIN_BYTES = 1 << 20
"""Saved tensors smaller than this (1 MiB) stay on the GPU."""


@dataclass(eq=False)
class _Stored:
    """One saved tensor's CPU copy (``host``; None when simulating) and what it came from."""

    host: torch.Tensor | None
    size: torch.Size
    dtype: torch.dtype
    device: torch.device
    nbytes: int
    event: Any = None  # the CUDA event after the device-to-host copy


def _is_parameter(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a parameter or a view of one (``weight.t()`` saved by a linear)."""
    return isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)


class ActivationOffload:
    """Saved-tensor hooks that keep the large saved activations of a forward in CPU memory (see
    the module docstring).  :meth:`install` runs every forward of a model under them (or enter
    :meth:`hooks` around a forward); the backward, wherever it runs, unpacks through them.

    Args:
        device: The compute device: saved tensors on it move, others stay.
        min_bytes: The smallest saved tensor that moves; None = :data:`MIN_BYTES`.
        simulate: Keep no data (fake-tensor plans): see the module docstring.

    Attributes:
        host_bytes: Bytes of CPU copies alive now (the saved activations of the current step).
        host_peak: The most that were alive at once since construction (pinned memory needed).
        packed: Saved tensors moved to the CPU (counted once each), since construction.
        unpacked: Copies made back on the device, since construction.
    """

    def __init__(self, device: torch.device | str, *, min_bytes: int | None = None, simulate: bool = False):
        self.device = torch.device(device)
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.simulate = simulate
        on_cuda = self.device.type == "cuda" and not simulate
        self.stream = torch.cuda.Stream(self.device) if on_cuda else None
        self.host_bytes = 0
        self.host_peak = 0
        self.packed = 0
        self.unpacked = 0
        # id(tensor) -> weak references to it and to its copy, and its version: one copy of a
        # tensor saved several times, for as long as autograd holds one of them.
        self._copies: dict[int, tuple[weakref.ref, weakref.ref, int]] = {}

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context manager to run a forward under (a new one per forward)."""
        self._copies = {}
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def install(self, model: nn.Module) -> ActivationOffload:
        """Run every forward of ``model`` under :meth:`hooks`: module hooks enter them before
        its forward and leave them after (also when it raises), so they hold whatever wraps the
        model later (DDP, Accelerate's autocast).  What the caller computes from the model's
        output (the loss: latent-sized tensors) is saved as usual.  Returns self."""
        active: list[torch.autograd.graph.saved_tensors_hooks] = []

        def enter(_module: nn.Module, _args: Any) -> None:
            context = self.hooks()
            context.__enter__()
            active.append(context)

        def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
            if active:
                active.pop().__exit__(None, None, None)

        model.register_forward_pre_hook(enter)
        model.register_forward_hook(leave, always_call=True)
        return self

    def moves(self, tensor: torch.Tensor) -> bool:
        """Whether a saved ``tensor`` goes to the CPU: on the compute device, at least
        ``min_bytes``, a plain tensor, not a parameter nor a view of one."""
        return (
            tensor.device.type == self.device.type
            and not hasattr(tensor, "__tensor_flatten__")
            and tensor.layout == torch.strided
            and tensor.numel() * tensor.element_size() >= self.min_bytes
            and not _is_parameter(tensor)
        )

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _Stored:
        if not self.moves(tensor):
            return tensor
        seen = self._copies.get(id(tensor))
        if seen is not None and seen[0]() is tensor and seen[2] == tensor._version:
            stored = seen[1]()
            if stored is not None:
                return stored
        nbytes = tensor.numel() * tensor.element_size()
        stored = _Stored(None, tensor.size(), tensor.dtype, tensor.device, nbytes)
        if not self.simulate:
            host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=self.stream is not None)
            if self.stream is None:
                host.copy_(tensor)
            else:
                # The side stream waits for the kernels that made the tensor, copies, and the
                # caching allocator keeps the tensor's memory until that copy is done.
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.stream):
                    host.copy_(tensor, non_blocking=True)
                    stored.event = self.stream.record_event()
                tensor.record_stream(self.stream)
            stored.host = host
        self._copies[id(tensor)] = (weakref.ref(tensor), weakref.ref(stored), tensor._version)
        self.packed += 1
        self.host_bytes += nbytes
        self.host_peak = max(self.host_peak, self.host_bytes)
        weakref.finalize(stored, self._release, nbytes)
        return stored

    def _release(self, nbytes: int) -> None:
        self.host_bytes -= nbytes

    def _unpack(self, packed: torch.Tensor | _Stored) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        self.unpacked += 1
        if packed.host is None:  # simulated: a new tensor of the saved one's shape
            return torch.empty(packed.size, dtype=packed.dtype, device=packed.device)
        if packed.event is not None:
            torch.cuda.current_stream(packed.device).wait_event(packed.event)
        return packed.host.to(packed.device, non_blocking=packed.event is not None)
