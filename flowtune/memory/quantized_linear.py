"""The forward and backward of a frozen linear layer whose weight torchao quantized.

A LoRA step needs from a frozen base layer ``y = x W^T + b`` only its output and the gradient of
its input, ``dx = dy W``; ``W`` itself gets no gradient.  Left to autograd, torchao's quantized
linears cost more memory than that:

- ``int8`` and ``fp8`` (weight-only) dequantize ``W`` inside their ``F.linear`` above autograd, so
  autograd saves the dequantized copy (bf16, as large as the unquantized weight) from the forward
  to the backward: with gradient checkpointing, one whole block's weights in bf16 while the block
  is recomputed.
- Dequantizing a whole weight at once takes several times its bf16 size in temporaries (NF4's
  lookup goes through int64 indices, about 7x; fp8's through float32), one layer at a time.
- torchao's fp8 matmul (dynamic activation scaling, ``torch._scaled_mm``) has no backward at all.

:class:`QuantizedLinear` replaces its forward with :class:`FrozenQuantizedLinear`, which saves
nothing for the backward (it reads the layer's current weight then, so block offload's onloaded
copy is the one used), and dequantizes at most :data:`CHUNK_WEIGHTS` weights at a time: the
weight's rows are split (:func:`dequantized_slices`: int8/float8 as views of their data and row
scales, NF4 into equal parts), and each slice is dequantized and multiplied in the compute
dtype, for the output's columns of those rows in the forward and ``dy[..., rows] W[rows]``
added up in the backward.  A weight quantized for fp8 matmuls (its activations are quantized on
the fly) is computed by torchao in one call in the forward: it never dequantizes there.

Dequantizing int8 and float8 weights with row scales takes one pass over the weight (int8, on
CUDA) or two (float8) in the compute dtype, where torchao's ``dequantize`` goes through float32
in four (7-10 bytes of temporaries per bf16 weight); the values are torchao's, bit for bit, when the
compute dtype is the dtype the weight was quantized from (its scales are then exact in it).

Precision: the input's gradient adds up the slices' products in the compute dtype.  In bf16 that
rounds once per slice: 24 slices of a [6144, 1024] weight measured 0.67% relative error against
float64, where one bf16 matmul has 0.29% (float32 accumulation would cost a float32 [tokens,
in_features] buffer per layer; not done).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_WEIGHTS = 1 << 23
"""The most weights one slice of a quantized weight holds (8.4M: 16 MiB in bf16)."""


def _row_scaled(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is torchao's int8 or float8 data ``qdata`` [rows, cols] with one scale
    per row, ``scale`` [rows, 1], and at most one zero point per row (``model.quantize``'s int8
    and fp8)."""
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    zero_point = getattr(weight, "zero_point", None)
    rows = (qdata.shape[0], 1) if qdata is not None else None
    return scale is not None and scale.shape == rows and (zero_point is None or zero_point.shape == rows)


def _row_scales(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The row scales [rows, 1] of a row-scaled ``weight`` in ``dtype``, and the offsets
    ``-zero_point * scale`` [rows, 1] (None without zero points); None where :func:`dequantize`
    leaves the weight to torchao (another layout, or ``dtype`` is not the weight's own)."""
    if dtype != weight.dtype or not _row_scaled(weight):
        return None
    scale = weight.scale.to(dtype)
    zero_point = getattr(weight, "zero_point", None)
    return scale, None if zero_point is None else -(zero_point.to(dtype) * scale)


def _scaled(
    qdata: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``qdata * scale + offset`` [rows, cols] in ``dtype`` (see :func:`dequantize`)."""
    if offset is None:
        return qdata.to(dtype).mul_(scale)
    return torch.addcmul(offset, qdata, scale)


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` (a torchao quantized tensor) as a plain tensor of ``dtype``.

    Row-scaled int8/float8 weights in the dtype they were quantized from, in one or two passes
    over the weight where torchao's goes through float32 in four:

    - int8: ``qdata * scale - zero_point * scale`` in one ``addcmul`` (CUDA casts the int8 data
      inside the kernel; a CPU makes a ``dtype`` copy of it first).  With torchao's symmetric
      int8 (zero points of 0: ``model.quantize``'s) the values are torchao's bit for bit: the
      product of an 8-bit integer and a scale exact in ``dtype`` is rounded once, as torchao
      rounds its float32 product; an asymmetric zero point would round once more.
    - float8: the data cast to ``dtype`` (exact), scaled in place: torchao's values bit for bit.

    Otherwise, torchao's own dequantization.
    """
    if hasattr(weight, "get_original_weight"):  # NF4Tensor
        return weight.get_original_weight().to(dtype)
    scales = _row_scales(weight, dtype)
    if scales is not None:
        return _scaled(weight.qdata, *scales, dtype)
    return weight.dequantize().to(dtype)


DEQUANTIZE_BYTES_PER_WEIGHT = {
    "int8": {2: 4, 4: 8},
    "fp8": {2: 2, 4: 4},
    "nf4": {2: 14, 4: 20},
}
"""Bytes per weight of the temporaries :func:`dequantize` of one slice allocates at its peak, by
mode and by the size of the weight's logical dtype (2: bf16/fp16, 4: float32): the dequantized
slice itself, and for int8 the CPU's cast copy of its data (CUDA makes none: there the plan is
high by a slice's bf16 size, 16 MiB at most); nf4 looks its codes up through int64 indices.
Measured on CPU tensors by ``tests/test_quantized_linear.py``."""


@functools.lru_cache(maxsize=4096)
def slice_rows(rows: int, cols: int, nf4_scale_blocks: int | None, chunk: int) -> int:
    """How many rows of a [rows, cols] quantized weight one slice holds: the fewest slices of at
    most ``chunk`` (:data:`CHUNK_WEIGHTS`) weights each (``rows``: one slice, when it is that
    small).  Cached: every forward and backward of a quantized layer asks.

    Args:
        nf4_scale_blocks: For an NF4 weight, its number of scale-of-scales blocks: its slices
            must be equal and hold whole blocks, so they may be smaller, or, where its shape
            allows no such split, it stays whole.
    """
    wanted = -(-rows * cols // chunk)
    if wanted <= 1:
        return rows
    if nf4_scale_blocks is None:
        return -(-rows // wanted)
    common = math.gcd(rows, nf4_scale_blocks)
    count = next((n for n in range(wanted, common + 1) if common % n == 0), 1)
    return rows // count


def row_slices(weight: torch.Tensor) -> list[tuple[int, int]]:
    """The row ranges ``(start, stop)`` of ``weight`` [out_features, in_features]'s slices:
    :func:`slice_rows` rows each."""
    rows, cols = weight.shape
    factors = getattr(weight, "quantization_factor", None)  # NF4Tensor: one per block of scales
    step = slice_rows(rows, cols, None if factors is None else factors.numel(), CHUNK_WEIGHTS)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def dequantized_slices(weight: torch.Tensor, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, W[start:stop])`` for each of :func:`row_slices`, dequantized in ``dtype``
    when it is asked for: the caller drops each slice before asking for the next.

    Row-scaled int8/float8 slices are made from views of the weight's data and scales (no
    torchao tensor is built per slice: that costs more host time than the slice's kernels);
    NF4 weights split into equal parts, other layouts slice through torchao.
    """
    ranges = row_slices(weight)
    scales = _row_scales(weight, dtype)
    if scales is not None:
        scale, offset = scales
        for start, stop in ranges:
            part_offset = None if offset is None else offset[start:stop]
            yield start, stop, _scaled(weight.qdata[start:stop], scale[start:stop], part_offset, dtype)
        return
    if len(ranges) == 1:
        parts = [weight]
    elif hasattr(weight, "quantization_factor"):  # NF4Tensor splits into equal parts
        parts = list(weight.split(ranges[0][1]))
    else:
        parts = [weight[start:stop] for start, stop in ranges]
    for (start, stop), part in zip(ranges, parts, strict=True):
        yield start, stop, dequantize(part, dtype)


def _computes_in_one_call(weight: torch.Tensor) -> bool:
    """Whether torchao's linear computes ``weight`` without dequantizing it (fp8 matmuls)."""
    return getattr(weight, "act_quant_kwargs", None) is not None


class FrozenQuantizedLinear(torch.autograd.Function):
    """``y = x W^T + b`` for a frozen quantized ``W`` (see the module docstring).

    ``x`` [..., in_features] -> ``y`` [..., out_features]; the backward returns ``dx``
    [..., in_features] (and ``db`` [out_features] when the bias trains).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, layer: nn.Linear) -> torch.Tensor:
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        device = x.device.type
        ctx.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        weight = layer.weight
        if _computes_in_one_call(weight):
            return F.linear(x, weight, bias)
        y = None
        for start, stop, dense in dequantized_slices(weight, ctx.dtype):
            if start == 0 and stop == weight.shape[0]:
                return F.linear(x, dense, bias)
            out = F.linear(x, dense, None if bias is None else bias[start:stop])
            del dense
            if y is None:
                y = out.new_empty(*x.shape[:-1], weight.shape[0])
            y[..., start:stop] = out
            del out
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        weight = ctx.layer.weight
        grad_x = None
        if ctx.needs_input_grad[0]:
            flat = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
            for start, stop, dense in dequantized_slices(weight, ctx.dtype):
                if grad_x is None:
                    grad_x = flat[:, start:stop] @ dense
                else:
                    grad_x.addmm_(flat[:, start:stop], dense)
                del dense
            grad_x = grad_x.reshape(*grad.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight torchao quantized, computed by
    :class:`FrozenQuantizedLinear`.  :func:`adopt` turns a quantized ``nn.Linear`` into one in
    place, so its parameters, name and hooks stay; peft wraps it like any linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FrozenQuantizedLinear.apply(x, self.bias, self)


def adopt(layer: nn.Linear) -> None:
    """Make the quantized ``layer`` a :class:`QuantizedLinear` (its class only changes)."""
    layer.__class__ = QuantizedLinear
