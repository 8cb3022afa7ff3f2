"""A quantized frozen linear (``flowtune.memory.quantized_linear``): its forward and backward equal
torchao's computation on the same quantized weight, it keeps nothing for the backward, it
dequantizes one slice of rows at a time, and those slices' temporaries are what ``flowtune plan``
counts.  ``fp8`` with float8 matmuls (a GPU of compute capability 8.9+) runs here through torchao's
own CPU path, with its hardware check lifted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowtune.memory import quantized_linear
from flowtune.memory.quantize import has_fp8_matmuls, quantize_linears
from flowtune.memory.quantized_linear import (
    DEQUANTIZE_BYTES_PER_WEIGHT,
    QuantizedLinear,
    dequantize,
    dequantized_slices,
    row_slices,
)
from tests.helpers import allocated_peak

CASES = {  # name: (mode, fp8 matmuls, dtype)
    "int8": ("int8", None, torch.float32),
    "fp8": ("fp8", False, torch.float32),
    "fp8-matmuls": ("fp8", True, torch.bfloat16),
    "nf4": ("nf4", None, torch.float32),
}


@pytest.fixture
def fp8_matmuls_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao refuses float8 matmul weights without a GPU that has them; its CPU path runs."""
    monkeypatch.setattr("torchao.quantization.quant_api._check_hardware_support", lambda granularity: None)


def _layer(mode: str, fp8: bool | None, dtype: torch.dtype, rows: int = 384, cols: int = 256) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(cols, rows).to(dtype).requires_grad_(False)
    summary = quantize_linears(layer, mode, fp8_matmuls=fp8)
    assert isinstance(layer, QuantizedLinear) and summary.quantized == [""]
    assert summary.fp8_matmuls == ([""] if fp8 else [])
    return layer


@pytest.mark.parametrize("case", list(CASES))
def test_slices_compute_torchao_s_result_and_keep_nothing_for_the_backward(
    case: str, monkeypatch: pytest.MonkeyPatch, fp8_matmuls_on_cpu: None
) -> None:
    mode, fp8, dtype = CASES[case]
    monkeypatch.setattr(quantized_linear, "CHUNK_WEIGHTS", 64 * 256)
    layer = _layer(mode, fp8, dtype)
    assert [stop - start for start, stop in row_slices(layer.weight)] == [64] * 6
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, 256, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 5, 384, dtype=dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.backward(grad)
    assert saved == []  # no dequantized copy, not even the weight: it is read again in the backward

    with torch.no_grad():  # torchao on the whole weight, and the gradient from its dequantization
        want = F.linear(x, layer.weight, layer.bias)
        want_grad = grad @ dequantize(layer.weight, dtype)
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y, want, **tolerance)
    torch.testing.assert_close(x.grad, want_grad, **tolerance)
    torch.testing.assert_close(layer.bias.grad, grad.sum((0, 1)), **tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_dequantize_gives_torchao_s_values_bit_for_bit(mode: str, dtype: torch.dtype) -> None:
    """In the dtype the weight was quantized from, the cast-and-scale path equals torchao's
    float32 dequantization, for the whole weight and for a slice of its rows."""
    weight = _layer(mode, False, dtype).weight
    spread = torch.logspace(-3, 3, weight.shape[0]).unsqueeze(1)  # scales of many magnitudes,
    weight.scale.copy_((weight.scale * spread).to(dtype).float())  # exact in ``dtype`` as torchao's are
    assert quantized_linear._row_scales(weight, dtype) is not None  # flowtune's path, not torchao's
    assert torch.equal(dequantize(weight, dtype), weight.dequantize().to(dtype))
    assert torch.equal(dequantize(weight[64:128], dtype), weight.dequantize()[64:128].to(dtype))


def test_fp8_says_whether_it_multiplies_in_float8() -> None:
    assert not has_fp8_matmuls("cpu") and not has_fp8_matmuls(None)
    layer = nn.Linear(64, 64)
    assert "weight-only (this device has no float8 matmuls)" in quantize_linears(layer, "fp8").describe()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["int8", "fp8", "nf4"])
def test_the_peak_is_one_slice_s_dequantization_as_the_plan_counts(
    mode: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A [1024, 256] weight in slices of 256 rows.  Dequantizing one slice allocates
    DEQUANTIZE_BYTES_PER_WEIGHT per weight (within one byte): what the plan counts.  The forward's
    and the backward's peaks exceed those of the unquantized layer by that one slice's
    temporaries, plus, in bf16, the copy of the slice this CPU's bf16 matmul makes (CUDA's make
    none).  The unquantized layer is taken in float32 (its outputs scaled to ``dtype``): CPU bf16
    matmuls allocate float32 scratch of their own."""
    monkeypatch.setattr(quantized_linear, "CHUNK_WEIGHTS", 256 * 256)
    layers = [nn.Linear(256, 1024).requires_grad_(False), _layer(mode, False, dtype, rows=1024)]
    weight = layers[1].weight
    assert len(row_slices(weight)) == 4
    planned = DEQUANTIZE_BYTES_PER_WEIGHT[mode][dtype.itemsize] * 256 * 256
    assert abs(allocated_peak(lambda: next(dequantized_slices(weight, dtype))) - planned) < 256 * 256
    peaks = []
    for layer, layer_dtype in zip(layers, [torch.float32, dtype], strict=True):
        x = torch.randn(4, 256, dtype=layer_dtype, requires_grad=True)
        output = {}
        forward = allocated_peak(lambda: output.setdefault("y", layer(x)))  # noqa: B023
        backward = allocated_peak(lambda: output["y"].backward(torch.ones_like(output["y"])))  # noqa: B023
        peaks.append(max(forward, backward))
    extra = peaks[1] - peaks[0] * dtype.itemsize // 4
    matmul_copy = 2 * 256 * 256 if dtype == torch.bfloat16 else 0
    assert planned - 256 * 256 < extra < planned + matmul_copy + 256 * 256, (peaks, planned)


def test_float8_matmuls_keep_the_transformer_s_output_within_the_stated_error(
    fp8_matmuls_on_cpu: None,
) -> None:
    """The tiny FLUX.1 in bf16 with fp8 matmuls in its blocks, against the same bf16 model
    unquantized: measured 0.8% (weight-only fp8 0.6%; bf16 itself is 3.2% from float32)."""
    from flowtune.families import get_family
    from flowtune.families.flux.tiny import tiny_flux_transformer
    from tests.helpers import tiny_flux_inputs

    torch.manual_seed(0)
    base = tiny_flux_transformer(hidden=64).requires_grad_(False).to(torch.bfloat16)
    inputs = {
        k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in tiny_flux_inputs().items()
    }
    with torch.no_grad():
        want = base(**inputs)[0].float()
        summary = quantize_linears(base, "fp8", get_family("flux").quantize_skip, fp8_matmuls=True)
        got = base(**inputs)[0].float()
    assert len(summary.fp8_matmuls) == len(summary.quantized) == 40
    assert summary.describe().endswith(", float8 matmuls in 40")
    assert 0 < float((got - want).norm() / want.norm()) < 0.015


def test_float8_matmul_weights_stream_with_block_offload(fp8_matmuls_on_cpu: None) -> None:
    """A LoRA trains on float8-matmul weights (peft wraps them), and its step with gradient
    checkpointing equals the same step with 3 of the 4 blocks offloaded, whose weights are
    empty while offloaded (strict)."""
    import copy

    from flowtune.families import get_family
    from flowtune.families.flux.tiny import tiny_flux_transformer
    from flowtune.train.model import add_lora
    from flowtune.train.offload import offload_blocks
    from tests.helpers import tiny_flux_inputs

    spec = get_family("flux")
    torch.manual_seed(0)
    base = tiny_flux_transformer(hidden=64).requires_grad_(False).to(torch.bfloat16)
    quantize_linears(base, "fp8", spec.quantize_skip, fp8_matmuls=True)
    inputs = {
        k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in tiny_flux_inputs().items()
    }
    grads = []
    for resident in (None, 1):
        model = copy.deepcopy(base)
        params = add_lora(model, spec, rank=4, alpha=4)
        torch.manual_seed(1)
        for param in params:
            nn.init.normal_(param, std=0.02)
        model.enable_gradient_checkpointing()
        model.train()
        if resident is not None:
            offload_blocks(model, spec, resident, torch.device("cpu"), strict=True)
        model(**inputs)[0].float().pow(2).mean().backward()
        grads.append([param.grad for param in params])
    assert all(g.abs().sum() > 0 for g in grads[0])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
