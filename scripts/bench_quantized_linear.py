"""Benchmark the frozen quantized layers and the LoRA layers of a training step, one layer at a time.

Three measurements, each on one layer, on the CPU or (``--device cuda``) a GPU:

  * dequantize: one slice of a FLUX-sized weight, [2730, 3072] = 8.4M weights of logical dtype
    bf16 (the most a slice holds, ``CHUNK_WEIGHTS``), per mode: torchao's own
    ``dequantize().to(bf16)`` against flowtune's ``dequantize`` (one ``addcmul`` for int8; a cast
    and an in-place scaling for fp8), which gives the same values (checked here bit for bit).
  * host time per slice: a ``QuantizedLinear`` [4096, 64] forward and backward on 2 tokens, whole
    and cut into 64 slices; the kernels are tiny, so the difference per slice is what each slice
    costs the host. For reference, building one torchao slice (``weight[a:b]``), which the
    slices no longer do, and taking a view of its data.
  * LoRA input: a peft LoRA layer (rank 16, float32 weights) on a bf16 [3072, 3072] base with a
    [1, 1024, 3072] bf16 input that needs its gradient, forward and backward under bf16 autocast:
    with ``CastUnlessAutocast`` (flowtune) against peft's cast to float32.

Times are medians of ``--repeats`` runs after a warm-up (``torch.cuda.synchronize()`` on CUDA);
peaks are the most bytes of storages the operators made and kept at once (``LiveBytes``, the
plan's counter, on real tensors), which excludes what kernels allocate inside themselves.

Usage: python scripts/bench_quantized_linear.py [--device cuda] [--repeats 20] [--write docs/performance.md]

With --write, only the section `## Quantized and LoRA layers` of the file is replaced (appended if
absent).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from perfdoc import write_section  # scripts/perfdoc.py (this directory is on sys.path)
from torch import nn

from flowtune.memory import quantized_linear
from flowtune.memory.plan import LiveBytes
from flowtune.memory.quantize import quantize_linears
from flowtune.quiet import quiet_libraries
from flowtune.train.model import CAST_UNLESS_AUTOCAST

SECTION = "## Quantized and LoRA layers"
CPU_NOTE = [
    "On a CPU, converting the data to bf16 costs most of the time either way, so one pass is no",
    "faster than torchao's four. On a GPU, dequantizing is bound by memory traffic: flowtune's int8",
    "pass moves about 3 bytes per weight against about 19 for torchao's (int8 -> bf16, minus the",
    "zero points, times float32 scales into float32, back to bf16); not measured on a GPU yet.",
    "",
]
MIB = 2**20


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object]) -> int:
    """The most bytes of storages ``fn``'s operators made that were alive at once."""
    with LiveBytes() as live:
        fn()
    return live.peak


def quantized(mode: str, rows: int, cols: int, device: str) -> nn.Linear:
    layer = nn.Linear(cols, rows, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    quantize_linears(layer, mode, fp8_matmuls=False)
    return layer


def bench_dequantize(device: str, repeats: int) -> list[str]:
    rows = [
        "| mode | torchao `dequantize` | flowtune `dequantize` | speed-up | temporaries: torchao | flowtune |"
    ]
    rows.append("| --- | --- | --- | --- | --- | --- |")
    for mode in ("int8", "fp8"):
        weight = quantized(mode, 2730, 3072, device).weight

        def theirs(weight: torch.Tensor = weight) -> torch.Tensor:
            return weight.dequantize().to(torch.bfloat16)

        def ours(weight: torch.Tensor = weight) -> torch.Tensor:
            return quantized_linear.dequantize(weight, torch.bfloat16)

        assert torch.equal(theirs(), ours()), mode
        slow, fast = timed(theirs, device, repeats), timed(ours, device, repeats)
        per_weight = weight.numel()
        rows.append(
            f"| {mode} | {slow * 1e3:.2f} ms | {fast * 1e3:.2f} ms | {slow / fast:.1f}x "
            f"| {peak_bytes(theirs) / per_weight:.1f} B/weight | {peak_bytes(ours) / per_weight:.1f} B/weight |"
        )
    return rows


def bench_slices(device: str, repeats: int) -> list[str]:
    rows = [
        "| mode | whole weight | 64 slices | per slice | torchao slice `weight[a:b]` | view `qdata[a:b]` |"
    ]
    rows.append("| --- | --- | --- | --- | --- | --- |")
    x = torch.randn(2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    for mode in ("int8", "fp8"):
        layer = quantized(mode, 4096, 64, device)
        weight = layer.weight

        def step(layer: nn.Linear = layer) -> None:
            layer(x).sum().backward()

        whole_chunk = quantized_linear.CHUNK_WEIGHTS
        try:
            quantized_linear.CHUNK_WEIGHTS = 1 << 30
            whole = timed(step, device, repeats)
            quantized_linear.CHUNK_WEIGHTS = 64 * 64
            assert len(quantized_linear.row_slices(weight)) == 64
            sliced = timed(step, device, repeats)
        finally:
            quantized_linear.CHUNK_WEIGHTS = whole_chunk
        subclass = timed(lambda weight=weight: weight[0:64], device, repeats * 10)
        view = timed(lambda weight=weight: weight.qdata[0:64], device, repeats * 10)
        rows.append(
            f"| {mode} | {whole * 1e3:.2f} ms | {sliced * 1e3:.2f} ms | {(sliced - whole) / 63 * 1e6:.0f} us "
            f"| {subclass * 1e6:.0f} us | {view * 1e6:.1f} us |"
        )
    return rows


def bench_lora_input(device: str, repeats: int) -> list[str]:
    from peft import LoraConfig, inject_adapter_in_model

    model = nn.Sequential(nn.Linear(3072, 3072, device=device, dtype=torch.bfloat16)).requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=["0"]), model)
    lora = model[0]
    for param in lora.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    x = torch.randn(1, 1024, 3072, device=device, dtype=torch.bfloat16, requires_grad=True)
    device_type = torch.device(device).type

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()

    rows = [
        "| peft input cast | forward + backward | peak of the step's own tensors |",
        "| --- | --- | --- |",
    ]
    for name, setting in (
        ("to float32 (peft)", True),
        ("none under autocast (flowtune)", CAST_UNLESS_AUTOCAST),
    ):
        lora.cast_input_dtype_enabled = setting
        rows.append(
            f"| {name} | {timed(step, device, repeats) * 1e3:.1f} ms | {peak_bytes(step) / MIB:.1f} MiB |"
        )
    return rows


def section(device: str, repeats: int) -> str:
    if device.startswith("cuda"):
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    lines = [
        SECTION,
        "",
        f"`python scripts/bench_quantized_linear.py --device {device}` ({machine}, torch {torch.__version__};",
        f"medians of {repeats} runs; peaks as `LiveBytes` counts them, without kernels' own scratch).",
        "",
        "Dequantizing one slice of 8.4M weights to bf16 (the values are torchao's, bit for bit):",
        "",
        *bench_dequantize(device, repeats),
        "",
        *(CPU_NOTE if not device.startswith("cuda") else []),
        "Host time per slice: a [4096, 64] quantized layer, forward and backward on 2 tokens:",
        "",
        *bench_slices(device, repeats),
        "",
        "A LoRA layer (rank 16, float32) on a bf16 [3072, 3072] base, a [1, 1024, 3072] input,",
        "bf16 autocast:",
        "",
        *bench_lora_input(device, repeats),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--write", type=Path, help=f"Replace the '{SECTION}' section of this file.")
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    text = section(args.device, args.repeats)
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)


if __name__ == "__main__":
    main()
