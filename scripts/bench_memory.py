"""Measure the memory savers: peak memory and time per training step against `flowtune plan`.

Each case is a bundled recipe (flux1-dev-lora, flux2-dev-lora, wan21-t2v-1.3b-lora) with LoRA
rank 16 (32 for Wan), batch 1, the recipe's largest bucket at `data.resolution`, gradient
checkpointing on and bf16 autocast, plus saver settings (`model.quantize`, `train.block_offload`,
`train.activation_offload`).  The `wan` cases are issue 20's long-clip goals: Wan 2.1 14B and
1.3B at 81 frames of ~480x832 (`data.resolution=640`), with and without activation offload; for
them the pinned CPU memory the saved activations take is reported under the table.  The transformer is built from
the bundled config with random weights (no download) by `flowtune.memory.steps.run_training_steps`,
the plan's own step runner, with the savers applied for real (torchao quantization, block offload
hooks), and runs `--steps` training steps; each case runs in a process of its own.

- On CUDA: the real shapes (FLUX.1-dev 12B, FLUX.2-dev 32B) at 1024 px; measured =
  `torch.cuda.max_memory_allocated` over the steps after the first (weights, LoRA, AdamW states,
  activations: what the plan predicts), also `max_memory_reserved` (the caching allocator's
  footprint, what nvidia-smi sees minus the CUDA context); s/step = median of those steps.
- On a CPU: the same cases at a reduced shape (1 double + 2 single blocks, 4 heads, 256 px, 64
  text tokens; Wan: 3 blocks); measured = the peak of the live bytes of the real tensors (the
  plan's counter on real data), so only the savers' accounting is compared, not CUDA's
  allocator.  There the "CPU copies" of activation offload are on the measured device too, so
  its cases measure more than the plan (which counts them as host memory).

The plan column is `flowtune plan` for the same recipe and overrides (fake tensors, no device).

Usage:
  python scripts/bench_memory.py [--device cuda] [--cases flux1-int8,...] [--steps 4]
      [--results bench.jsonl] [--skip-plan] [--budget 540] [--write docs/performance.md]
  python scripts/bench_memory.py --plan-only --device cuda --results plan.jsonl   # no GPU needed
  python scripts/bench_memory.py --render bench.jsonl [--render plan.jsonl] --write docs/performance.md

Issue 17's goals on a GPU (docs/performance.md "Memory savers"), one call, most wanted first, plans
taken on any machine first (they spend no device time):
  python scripts/bench_memory.py --plan-only --device cuda --cases flux2-int8,...(as below) --results plan.jsonl
  python scripts/bench_memory.py --device cuda --skip-plan --steps 3 --budget 480 --results bench.jsonl \
      --cases flux2-int8,flux2-nf4,flux2-fp8,flux1-fp8,flux1-int8,flux1-bf16,flux2-bf16,flux2-int8-act,flux2-nf4-act,flux1-nf4
  and, in seconds, one layer at a time: python scripts/bench_quantized_linear.py --device cuda

Activation offload on a GPU (docs/performance.md "Long clips"), one call, plans taken here first:
  python scripts/bench_memory.py --plan-only --device cuda --cases wan14-int8-offload,... --results plan.jsonl
  python scripts/bench_memory.py --device cuda --skip-plan --steps 3 --budget 540 --results bench.jsonl \
      --cases wan14-int8-offload-act,wan14-int8-24gb,wan14-int8-offload,wan13-bf16-81f-act,wan13-bf16-81f

--results appends one JSON line per case as it finishes (a run cut short keeps what it measured);
--render rebuilds the table from such files (the last line per case and field wins), so the GPU
measurement and the plan can be taken on different machines.  --write replaces the section
`## Memory savers` of docs/performance.md (the table and its introduction; the hand-written
`## Memory savers: notes` after it stays, to be brought up to date by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
HEADING = "## Memory savers"

COMMON = [
    "lora.rank=16",
    "lora.alpha=16",
    "train.batch_size=1",
    "train.gradient_checkpointing=true",
    "train.mixed_precision=bf16",
    "model.dtype=bfloat16",
]
# The reduced shape of the CPU run: the family's config with fewer and narrower blocks.
REDUCED = {"num_layers": 1, "num_single_layers": 2, "num_attention_heads": 4}
REDUCED_OVERRIDES = ["data.resolution=256", "data.max_sequence_length=64"]


@dataclass(frozen=True)
class Case:
    name: str
    recipe: str
    overrides: tuple[str, ...]
    resident_cpu: int | None = None  # block_offload on the reduced model (3 blocks)
    reduced: tuple[tuple[str, int], ...] | None = None  # the reduced config; None = REDUCED

    def all_overrides(self, device: str) -> list[str]:
        overrides = list(self.overrides)
        if device == "cpu":
            overrides = [o for o in overrides if not o.startswith("train.block_offload=")]
            if self.resident_cpu is not None:
                overrides.append(f"train.block_offload={self.resident_cpu}")
        return [*COMMON, *overrides]


CASES = [
    Case("flux1-bf16", "flux1-dev-lora", ()),
    Case("flux1-int8", "flux1-dev-lora", ("model.quantize=int8",)),
    Case("flux1-nf4", "flux1-dev-lora", ("model.quantize=nf4",)),
    Case("flux1-fp8", "flux1-dev-lora", ("model.quantize=fp8",)),
    Case("flux2-int8", "flux2-dev-lora", ("model.quantize=int8",)),
    Case("flux2-nf4", "flux2-dev-lora", ("model.quantize=nf4",)),
    Case("flux2-int8-offload", "flux2-dev-lora", ("model.quantize=int8", "train.block_offload=16"), 1),
    Case("flux1-bf16-offload", "flux1-dev-lora", ("train.block_offload=12",), 1),
    Case("flux1-int8-offload", "flux1-dev-lora", ("model.quantize=int8", "train.block_offload=12"), 1),
    Case("flux2-bf16", "flux2-dev-lora", ()),
    # fp8 multiplies in float8 on an H100/H200; int8 and nf4 with the blocks' inputs in CPU memory
    # (the FLUX.2 goals of 38 GB with int8 and 22 GB with nf4).
    Case("flux2-fp8", "flux2-dev-lora", ("model.quantize=fp8",)),
    Case("flux2-int8-act", "flux2-dev-lora", ("model.quantize=int8", "train.activation_offload=true")),
    Case("flux2-nf4-act", "flux2-dev-lora", ("model.quantize=nf4", "train.activation_offload=true")),
]
# Wan 2.1 at 81 frames of ~480x832 (the 336x1248 bucket of data.resolution=640), the recipe's rank.
WAN_CLIP = ("data.frames=81", "data.resolution=640", "lora.rank=32", "lora.alpha=32")
WAN14 = ("model.pretrained=Wan-AI/Wan2.1-T2V-14B-Diffusers", *WAN_CLIP, "model.quantize=int8")
WAN_REDUCED = (("num_layers", 3), ("num_attention_heads", 4))
ACTIVATIONS = "train.activation_offload=true"
CASES += [
    Case("wan14-int8-offload", "wan21-t2v-1.3b-lora", (*WAN14, "train.block_offload=30"), 1, WAN_REDUCED),
    Case(
        "wan14-int8-offload-act",
        "wan21-t2v-1.3b-lora",
        (*WAN14, "train.block_offload=30", ACTIVATIONS),
        1,
        WAN_REDUCED,
    ),
    # What flowtune plan fits in 24 GiB with activation offload: 26 of 40 blocks resident.
    Case(
        "wan14-int8-24gb",
        "wan21-t2v-1.3b-lora",
        (*WAN14, "train.block_offload=26", ACTIVATIONS),
        1,
        WAN_REDUCED,
    ),
    Case("wan13-bf16-81f", "wan21-t2v-1.3b-lora", WAN_CLIP, None, WAN_REDUCED),
    Case("wan13-bf16-81f-act", "wan21-t2v-1.3b-lora", (*WAN_CLIP, ACTIVATIONS), None, WAN_REDUCED),
]
BY_NAME = {case.name: case for case in CASES}


def _recipe(case: Case, device: str, model_dir: Path | None):
    from flowtune.recipe import load_recipe, resolve_recipe_path

    overrides = case.all_overrides(device)
    if model_dir is not None:
        overrides += [f"model.pretrained={model_dir}", *REDUCED_OVERRIDES]
    return load_recipe(resolve_recipe_path(case.recipe), overrides)


def _reduced_model(case: Case, root: Path) -> Path:
    """A folder holding only transformer/config.json: the case's bundled config, reduced."""
    from flowtune.memory.plan import load_transformer_config
    from flowtune.recipe import load_recipe, resolve_recipe_path

    pretrained = load_recipe(resolve_recipe_path(case.recipe), []).model.pretrained
    config, _ = load_transformer_config(pretrained)
    folder = root / case.recipe
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    reduced = REDUCED if case.reduced is None else dict(case.reduced)
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, **reduced}))
    return folder


def measure(case: Case, device: str, steps: int) -> dict:
    """Run the case's steps for real on ``device`` (in this process) and return its figures."""
    import torch

    from flowtune.distributed import avoid_cudnn_attention
    from flowtune.families import get_family
    from flowtune.memory.plan import LiveBytes, load_transformer_config
    from flowtune.memory.steps import run_training_steps
    from flowtune.quiet import quiet_libraries

    quiet_libraries()
    avoid_cudnn_attention()  # as the trainer does: cuDNN's attention backward failed here
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _reduced_model(case, Path(tmp)) if device == "cpu" else None
        recipe = _recipe(case, device, model_dir)
        spec = get_family(recipe.model.family)
        config, _ = load_transformer_config(recipe.model.pretrained)
        tracker = LiveBytes() if device == "cpu" else None
        start = time.perf_counter()
        run = run_training_steps(
            recipe, spec, config, fake=False, device=device, savers=True, steps=steps, tracker=tracker
        )
        total = time.perf_counter() - start
    timed = run.seconds[1:] or run.seconds
    result = {
        "case": case.name,
        "device": torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else platform.processor() or "cpu",
        "measured_peak": run.device_peak if run.device_peak is not None else run.peak,
        "seconds_per_step": statistics.median(timed),
        "steps": len(run.seconds),
        "wall_seconds": round(total, 1),
        "resolution": f"{run.width}x{run.height}",
        "text_tokens": int(recipe.data.max_sequence_length),
        "measured_host": run.host_activations,
        "torch": torch.__version__,
    }
    if device.startswith("cuda"):
        result["measured_reserved"] = torch.cuda.max_memory_reserved(device)
    return result


def plan(case: Case, device: str) -> dict:
    """The plan's figures for the case (fake tensors, on the CPU)."""
    from flowtune.families import get_family
    from flowtune.memory.plan import plan_training_step
    from flowtune.quiet import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _reduced_model(case, Path(tmp)) if device == "cpu" else None
        recipe = _recipe(case, device, model_dir)
        step = plan_training_step(recipe, get_family(recipe.model.family))
    return {
        "case": case.name,
        "plan_peak": step.peak,
        "plan_weights": step.weights,
        "plan_activations": step.activations,
        "plan_offload_saved": step.offload_saved,
        "plan_host": step.host_activations,
    }


def _child(args: argparse.Namespace) -> None:
    case = BY_NAME[args.child]
    result = plan(case, args.device) if args.child_plan else measure(case, args.device, args.steps)
    print("RESULT " + json.dumps(result), flush=True)


def _run_child(case: Case, args: argparse.Namespace, *, plan_only: bool, timeout: float) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        case.name,
        "--device",
        args.device,
        "--steps",
        str(args.steps),
    ]
    if plan_only:
        command.append("--child-plan")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"case": case.name, "error": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    if "OutOfMemoryError" in done.stderr or "out of memory" in done.stderr:
        tail = "out of memory: " + tail
    return {"case": case.name, "error": tail[:300]}


def _fmt_gib(value: float | None) -> str:
    return (
        "-"
        if value is None
        else f"{value / GIB:.2f} GiB"
        if value >= 0.1 * GIB
        else f"{value / 2**20:.1f} MiB"
    )


def render(results: dict[str, dict], device_label: str) -> str:
    """The `## Memory savers` section for the merged per-case results."""
    lines = [
        f"{HEADING}\n",
        "\n",
        "`scripts/bench_memory.py` builds each bundled recipe's transformer from its config with random\n",
        "weights (no download), applies the saver for real (torchao quantization, block offload hooks)\n",
        "and runs training steps through `flowtune.memory.steps.run_training_steps`, the step the plan\n",
        "traces: LoRA rank 16 on the family's targets, batch 1 at the largest 1024 px bucket, the\n",
        "recipe's text length, gradient checkpointing, bf16 autocast, AdamW. Measured = the peak of\n",
        "`torch.cuda.max_memory_allocated` over the steps after the first; reserved = the caching\n",
        "allocator's peak (add the CUDA context, ~0.5 GiB, for what nvidia-smi shows); s/step = median\n",
        f"of the timed steps. {device_label}\n",
        "\n",
        "| case | overrides | bucket | plan | measured | plan error | reserved | s/step |\n",
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    ]
    for case in CASES:
        r = results.get(case.name)
        if r is None:
            continue
        overrides = ", ".join(f"`{o}`" for o in case.overrides) or "(bf16 base)"
        if "error" in r and "measured_peak" not in r:
            lines.append(
                f"| {case.name} | {overrides} | | {_fmt_gib(r.get('plan_peak'))} | {r['error']} | | | |\n"
            )
            continue
        measured, planned = r.get("measured_peak"), r.get("plan_peak")
        error = f"{(planned - measured) / measured * 100:+.1f}%" if measured and planned else "-"
        seconds = f"{r['seconds_per_step']:.2f}" if "seconds_per_step" in r else "-"
        lines.append(
            f"| {case.name} | {overrides} | {r.get('resolution', '-')} | {_fmt_gib(planned)} | {_fmt_gib(measured)} | {error} | "
            f"{_fmt_gib(r.get('measured_reserved'))} | {seconds} |\n"
        )
    hosts = [
        f"- {name}: plan {_fmt_gib(r.get('plan_host'))}, measured {_fmt_gib(r.get('measured_host'))}\n"
        for name, r in ((c.name, results.get(c.name)) for c in CASES)
        if r is not None and (r.get("plan_host") or r.get("measured_host"))
    ]
    if hosts:
        lines += [
            "\n",
            "Pinned CPU memory holding the saved activations (`train.activation_offload`):\n\n",
            *hosts,
        ]
    return "".join(lines)


def _merge(paths: list[Path]) -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                merged.setdefault(record["case"], {}).update(record)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--skip-plan", action="store_true")
    parser.add_argument("--plan-only", action="store_true", help="the plans of --device's shapes, no run")
    parser.add_argument(
        "--budget", type=float, default=540.0, help="stop starting cases after this many seconds"
    )
    parser.add_argument("--case-timeout", type=float, default=240.0)
    parser.add_argument("--render", type=Path, action="append", default=[])
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--note", action="append", default=[], help="a paragraph to add under the table")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-plan", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    if args.render:
        results = _merge(args.render)
        device = next((r["device"] for r in results.values() if "device" in r), "unknown device")
    else:
        start = time.perf_counter()
        results = {}
        for name in args.cases.split(","):
            case = BY_NAME[name]
            left = args.budget - (time.perf_counter() - start)
            if left < 20:
                print(f"{name}: skipped (budget)", flush=True)
                continue
            record = (
                {"case": name}
                if args.plan_only
                else _run_child(case, args, plan_only=False, timeout=min(args.case_timeout, left))
            )
            if not args.skip_plan:
                record.update(_run_child(case, args, plan_only=True, timeout=300))
            results[name] = record
            print(json.dumps(record), flush=True)
            if args.results is not None:
                with args.results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
        device = next((r["device"] for r in results.values() if "device" in r), args.device)
    label = (
        f"Measured on {device} (torch {next((r['torch'] for r in results.values() if 'torch' in r), '?')})."
    )
    section = render(results, label) + "".join(f"\n{note}\n" for note in args.note)
    print(section)
    if args.write is not None:
        sys.path.insert(0, str(Path(__file__).parent))
        from perfdoc import write_section

        write_section(args.write, HEADING, section)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flowtune.allocator import configure_allocator

    configure_allocator()  # the allocator setting flowtune's commands run with (flowtune.allocator)
    main()
