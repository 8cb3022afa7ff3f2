"""Benchmark the foundation: tiny-pipeline build time and the cost of FlowMatchingPipeline.step.

Measures, on whatever machine runs it (CPU by default, CUDA with --device cuda):
  * `make_tiny("flux")`: seconds to build and save the tiny FLUX.1 pipeline (imports excluded);
  * one training step (forward + backward) of a FLUX-shaped transformer through
    `FlowMatchingPipeline.step`, against the same transformer called directly with the same inputs:
    the difference is what the pipeline adds (sampling, noising, packing, loss);
  * `sample_timesteps` for a large batch.

Usage: python scripts/bench_core.py [--device cpu|cuda] [--write docs/performance.md]
(--write replaces the file up to its `## Data path` section, which scripts/bench_data.py writes.)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flowtune.flow_matching import create_pipeline
from flowtune.quiet import quiet_libraries
from flowtune.tiny import make_tiny, tiny_flux_transformer


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_step(device: str, batch: int, side: int, repeats: int) -> tuple[float, float]:
    """(pipeline step, direct call) median seconds for a 2+2-block, hidden-32 FLUX transformer."""
    torch.manual_seed(0)
    model = tiny_flux_transformer().train().to(device)
    h = side // 8
    data = {
        "image_latents": torch.randn(batch, 16, h, h, device=device),
        "text_embeddings": torch.randn(batch, 32, 32, device=device),
        "pooled_prompt_embeds": torch.randn(batch, 32, device=device),
    }
    pipe = create_pipeline("flux")

    def pipeline_step():
        _, loss, _, _ = pipe.step(model, data, dtype=torch.float32, collect_metrics=False, check_loss=False)
        loss.backward()

    adapter = pipe.model_adapter
    packed = adapter._pack_latents(data["image_latents"])
    ids = adapter._prepare_latent_image_ids(batch, h, h, device, torch.float32)[0]

    def direct_step():
        pred = model(
            hidden_states=packed,
            encoder_hidden_states=data["text_embeddings"],
            pooled_projections=data["pooled_prompt_embeds"],
            timestep=torch.full((batch,), 0.5, device=device),
            img_ids=ids,
            txt_ids=torch.zeros(32, 3, device=device),
            guidance=torch.full((batch,), 3.5, device=device),
            return_dict=False,
        )[0]
        torch.nn.functional.mse_loss(pred, packed).backward()

    return timed(pipeline_step, repeats), timed(direct_step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--write", type=Path, help="Write the results as Markdown to this file.")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as tmp:
        make_tiny("flux", Path(tmp) / "warm")  # first call pays lazy imports
        build = timed(lambda: make_tiny("flux", Path(tmp) / "tiny", overwrite=True), repeats=5, warmup=0)
        size = sum(f.stat().st_size for f in (Path(tmp) / "tiny").rglob("*") if f.is_file())

    rows = []
    for batch, side in ((1, 64), (4, 64), (4, 128)):
        piped, direct = bench_step(args.device, batch, side, args.repeats)
        rows.append((batch, side, piped, direct))
    pipe = create_pipeline("flux", device=args.device)
    sampling = timed(lambda: pipe.sample_timesteps(4096), repeats=args.repeats)

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [
        "# Performance",
        "",
        "Measured by `scripts/bench_core.py`; re-run it to refresh this file",
        f"(`python scripts/bench_core.py --write docs/performance.md`). Machine: {args.device}, {machine}.",
        "",
        "## Tiny pipelines",
        "",
        f'`make_tiny("flux")` builds and saves the tiny FLUX.1 pipeline in {build * 1000:.0f} ms '
        f"(median of 5, imports excluded; a cold `flowtune make-tiny` process adds the torch/diffusers "
        f"imports, a few seconds); the directory is {size / 1e6:.2f} MB.",
        "",
        "## FlowMatchingPipeline.step overhead",
        "",
        "Forward + backward of a FLUX-shaped transformer (2 double + 2 single blocks, hidden 32), "
        "float32, through `FlowMatchingPipeline.step` (collect_metrics and check_loss off, as on the hot "
        "path) versus the same transformer called directly on prepared inputs. Median of "
        f"{args.repeats}.",
        "",
        "| batch | image | pipeline step | direct call | pipeline overhead |",
        "| --- | --- | --- | --- | --- |",
    ]
    for batch, side, piped, direct in rows:
        lines.append(
            f"| {batch} | {side}x{side} | {piped * 1000:.1f} ms | {direct * 1000:.1f} ms | "
            f"{(piped - direct) * 1000:+.1f} ms |"
        )
    lines += ["", f"`sample_timesteps(4096)` (logit_normal + shift): {sampling * 1e6:.0f} µs.", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        # Keep the sections other scripts write (scripts/bench_data.py: "## Data path" and after).
        old = args.write.read_text() if args.write.exists() else ""
        start = old.find("\n## Data path\n")
        args.write.write_text(text + old[start:] if start >= 0 else text)


if __name__ == "__main__":
    main()
