"""Benchmark the training step: flowtune's `Trainer.train_step` against a bare hand-written loop.

Both run in one process, in one run, on the same FLUX-shaped transformer (by default 8 double +
8 single blocks, hidden 512 = 4 heads of 128, 64x64 latents from 512 px images = 1024 image
tokens, 128 text tokens), loaded from the same folder, with the same LoRA (rank 16, alpha 16, on
the targets flowtune expands for FLUX.1), the same batch size, the same AdamW hyper-parameters and
the same precision (float32 on a CPU; bfloat16 weights and bf16 autocast on CUDA):

  * flowtune: a recipe over a temporary model folder (the tiny FLUX.1 pipeline of
    `make_tiny("flux")` with its transformer replaced by the bigger one) and a generated shapes
    dataset, `preprocess`, then `Trainer.setup()` and `Trainer.train_step(batches)` per step, as
    `Trainer.train` calls it (data fetch, per-sample generators, flow matching, Accelerate's
    backward / clipping / optimizer / schedule);
  * bare: `FluxTransformer2DModel.from_pretrained` + peft `add_adapter`, `torch.optim.AdamW`, one
    cached batch held on the device, and per step sigma = shift(sigmoid(randn)), noise, x_t, 2x2
    packing, ids, the forward, unpacking, the weighted MSE, backward, `clip_grad_norm_`, step,
    `zero_grad`. No flowtune code and no framework.

After two warm-up steps each, the two take turns, `--steps` steps each per round for `--rounds`
rounds (the order alternates between rounds), so that a noisy neighbour on a shared machine hits
both alike; every step is timed on its own (with `torch.cuda.synchronize()` on CUDA) and the
medians and minima are compared. A last pass of flowtune steps with timers around its data fetch,
per-sample generators and random draws tells what flowtune's extra host work costs.

Usage: python scripts/bench_train.py [--double 8] [--single 8] [--heads 4] [--image 512]
       [--text-len 128] [--batch 1] [--steps 3] [--rounds 10] [--write docs/performance.md]

With --write, only the section starting at `## Training step` (up to the next `## ` heading) is
replaced; it is appended if absent. The other sections belong to scripts/bench_core.py and
scripts/bench_data.py.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from perfdoc import write_section  # scripts/perfdoc.py (this directory is on sys.path)
from rich.console import Console

import flowtune.flow_matching.rng as rng_module
import flowtune.train.trainer as trainer_module
from flowtune.data.preprocess import preprocess
from flowtune.data.synthetic import make_shapes_dataset
from flowtune.families import get_family
from flowtune.quiet import quiet_libraries
from flowtune.recipe import load_recipe
from flowtune.tiny import CLIP_HIDDEN, LATENT_CHANNELS, T5_D_MODEL, make_tiny
from flowtune.train.model import expand_target_modules
from flowtune.train.trainer import Trainer

SECTION = "## Training step"
HEAD_DIM = 128
ROPE_AXES = (16, 56, 56)  # sums to HEAD_DIM, as FLUX.1's
LORA_RANK = 16
LORA_ALPHA = 16
WARMUP = 2
IMAGES = 8
TARGET = 1.05  # flowtune may cost at most 5% more per step than the bare loop
# The command-line defaults; the section's command line names only the options that differ.
DEFAULTS = {
    "double": 8,
    "single": 8,
    "heads": 4,
    "image": 512,
    "text_len": 128,
    "batch": 1,
    "steps": 3,
    "rounds": 10,
}


@dataclass
class Setup:
    """What both sides are built from."""

    device: torch.device
    dtype: torch.dtype
    mixed_precision: str
    model_dir: Path
    recipe_path: Path
    parameters: int


@dataclass
class Result:
    """Per-step seconds of each side, per round, and the breakdown of flowtune's host work."""

    times: dict[str, list[list[float]]]
    trainable: int
    latents: tuple[int, ...]
    text_tokens: int
    breakdown: dict[str, float]
    breakdown_steps: int
    breakdown_step_seconds: float

    def flat(self, name: str) -> list[float]:
        return [t for round_ in self.times[name] for t in round_]

    def median(self, name: str) -> float:
        return statistics.median(self.flat(name))

    def best(self, name: str) -> float:
        return min(self.flat(name))

    def round_ratios(self) -> list[float]:
        """flowtune / bare of each round's medians."""
        return [
            statistics.median(f) / statistics.median(b)
            for f, b in zip(self.times["flowtune"], self.times["bare"], strict=True)
        ]


def machine_info(device: torch.device) -> str:
    """Device, CPU, threads, torch version and the load average (the machine may be shared)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    what = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    return (
        f"{what}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; load average at start {load}"
    )


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a step's time is its real cost."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- setup ------------------------------------------------------------------------------------


def build(root: Path, args: argparse.Namespace) -> Setup:
    """The model folder (tiny FLUX.1 pipeline with a bigger transformer), the dataset, the recipe
    and the cache."""
    from diffusers import FluxTransformer2DModel

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype_name, mixed_precision = ("bfloat16", "bf16") if cuda else ("float32", "no")

    model_dir = make_tiny("flux", root / "model")
    shutil.rmtree(model_dir / "transformer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=LATENT_CHANNELS * 4,
            num_layers=args.double,
            num_single_layers=args.single,
            attention_head_dim=HEAD_DIM,
            num_attention_heads=args.heads,
            joint_attention_dim=T5_D_MODEL,  # the cached text embeddings come from the tiny encoders
            pooled_projection_dim=CLIP_HIDDEN,
            guidance_embeds=True,
            axes_dims_rope=ROPE_AXES,
        )
    parameters = sum(p.numel() for p in transformer.parameters())
    transformer.save_pretrained(model_dir / "transformer", safe_serialization=True)
    del transformer

    make_shapes_dataset(root / "dataset", count=max(IMAGES, args.batch), sizes=((args.image, args.image),))
    recipe_path = root / "bench.yaml"
    recipe_path.write_text(
        f"""\
model:
  family: flux
  pretrained: {model_dir}
  dtype: {dtype_name}
lora:
  rank: {LORA_RANK}
  alpha: {LORA_ALPHA}
data:
  source: {root / "dataset"}
  cache_dir: {root / "cache"}
  resolution: {args.image}
  max_sequence_length: {args.text_len}
train:
  output_dir: {root / "run"}
  max_steps: 1000000
  batch_size: {args.batch}
  mixed_precision: "{mixed_precision}"
  log_every: 1000000
  checkpoint_every: 1000000
  overwrite: true
"""
    )
    preprocess(load_recipe(recipe_path), console=Console(quiet=True))
    return Setup(device, getattr(torch, dtype_name), mixed_precision, model_dir, recipe_path, parameters)


class TimedIterator:
    """Wraps an iterator and adds the seconds spent in its ``__next__`` to ``seconds``."""

    def __init__(self, inner: Iterator, seconds: dict[str, float], key: str):
        self.inner, self.seconds, self.key = inner, seconds, key

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.inner)
        finally:
            self.seconds[self.key] += time.perf_counter() - start


@contextmanager
def timers(targets: dict[str, list[tuple[object, str]]], seconds: dict[str, float]) -> Iterator[None]:
    """Add the seconds spent in functions to ``seconds[group]`` while the context is open.

    Args:
        targets: ``{group: [(owner, attribute name), ...]}``; each function is wrapped in place
            and restored on exit. Nested calls within one group are counted once.
    """
    depth = dict.fromkeys(targets, 0)
    saved = []

    def wrap(group: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            depth[group] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[group] -= 1
                if depth[group] == 0:
                    seconds[group] += time.perf_counter() - start

        return timed

    for group, pairs in targets.items():
        for owner, name in pairs:
            fn = getattr(owner, name)
            saved.append((owner, name, fn, name in vars(owner)))
            setattr(owner, name, wrap(group, fn))
    try:
        yield
    finally:
        for owner, name, fn, own in reversed(saved):
            if own:
                setattr(owner, name, fn)
            else:
                delattr(owner, name)


# -- the bare loop ----------------------------------------------------------------------------


def bare_loop(setup: Setup, recipe, batch: dict[str, torch.Tensor]) -> tuple[Callable[[], None], int]:
    """One step of a minimal hand-written LoRA loop (no flowtune code) and its trainable count."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    device, dtype = setup.device, setup.dtype
    transformer = FluxTransformer2DModel.from_pretrained(
        setup.model_dir, subfolder="transformer", dtype=dtype
    )
    transformer.to(device).requires_grad_(False).train()
    targets = expand_target_modules(transformer, list(get_family("flux").lora_target_modules))
    transformer.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=targets))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = recipe.optimizer
    optimizer = torch.optim.AdamW(
        params,
        lr=opt.lr,
        betas=tuple(opt.betas),
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        fused=device.type == "cuda" or None,
    )

    latents = batch["image_latents"].to(device, torch.float32)
    text = batch["text_embeddings"].to(device, dtype)
    pooled = batch["pooled_prompt_embeds"].to(device, dtype)
    b, c, h, w = latents.shape
    shift = float(recipe.flow.flow_shift)
    guidance_scale = 3.5
    autocast = (
        functools.partial(torch.autocast, "cuda", torch.bfloat16)
        if setup.mixed_precision == "bf16"
        else nullcontext
    )

    def step() -> None:
        u = torch.sigmoid(torch.randn(b, device=device))
        sigma = shift / (shift + (1 / u - 1))
        s = sigma.view(b, 1, 1, 1)
        noise = torch.randn_like(latents)
        x_t = (1 - s) * latents + s * noise
        tokens = x_t.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=device)
        img_ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
        img_ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
        txt_ids = torch.zeros(text.shape[1], 3, device=device)
        guidance = torch.full((b,), guidance_scale, device=device)
        with autocast():
            pred = transformer(
                hidden_states=tokens.to(dtype),
                encoder_hidden_states=text,
                pooled_projections=pooled,
                timestep=sigma.to(dtype),
                img_ids=img_ids.reshape(-1, 3),
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0]
        pred = pred.float().view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        mse = torch.nn.functional.mse_loss(pred, noise - latents, reduction="none")
        loss = ((1 + shift * s) * mse).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


# -- measuring --------------------------------------------------------------------------------


def bench(setup: Setup, steps: int, rounds: int) -> Result:
    """Warm up both sides, then take turns; then a flowtune pass with timers for the breakdown."""
    quiet = Console(quiet=True)
    recipe = load_recipe(setup.recipe_path)
    trainer = Trainer(recipe, console=quiet)
    trainer.setup()
    batches = trainer.batches()
    # The bare loop's batch: read once from the same cache, without moving the trainer's sampler.
    batch = trainer.collate([trainer.dataset[i] for i in range(recipe.train.batch_size)])
    bare_step, trainable = bare_loop(setup, recipe, batch)
    flowtune_trainable = trainer.trainable_parameters
    if trainable != flowtune_trainable:
        raise SystemExit(f"LoRA sizes differ: flowtune {flowtune_trainable}, bare {trainable} parameters")

    def flowtune_step(source: Iterator = batches) -> None:
        trainer.train_step(source)
        trainer.step += 1  # Trainer.train does this after each step

    sides = {"flowtune": flowtune_step, "bare": bare_step}
    for fn in sides.values():
        for _ in range(WARMUP):
            fn()
            sync(setup.device)
    times: dict[str, list[list[float]]] = {name: [] for name in sides}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            per_step = []
            for _ in range(steps):
                start = time.perf_counter()
                sides[name]()
                sync(setup.device)
                per_step.append(time.perf_counter() - start)
            times[name].append(per_step)
            print(f"round {r + 1}/{rounds} {name:8s} " + " ".join(f"{t:.3f}" for t in per_step), flush=True)

    # Breakdown: flowtune's host work that the bare loop does not do (or does more simply).
    seconds = {"data": 0.0, "generators": 0.0, "draws": 0.0}
    targets = {
        "generators": [(trainer_module, "sample_generators")],
        "draws": [(trainer.flow, "sample_timesteps"), (rng_module, "randn"), (rng_module, "rand")],
    }
    timed_batches = TimedIterator(batches, seconds, "data")
    total = 0.0
    with timers(targets, seconds):
        for _ in range(steps):
            start = time.perf_counter()
            flowtune_step(timed_batches)
            sync(setup.device)
            total += time.perf_counter() - start
    trainer.cleanup()
    breakdown = {k: v / steps for k, v in seconds.items()}
    shape = tuple(batch["image_latents"].shape)
    return Result(times, trainable, shape, batch["text_embeddings"].shape[1], breakdown, steps, total / steps)


# -- report -----------------------------------------------------------------------------------


def render(args: argparse.Namespace, machine: str, setup: Setup, result: Result, wall: float) -> str:
    """The ``## Training step`` section as Markdown (ends with a newline)."""
    f_med, b_med = result.median("flowtune"), result.median("bare")
    f_best, b_best = result.best("flowtune"), result.best("bare")
    ratio = f_med / b_med
    ratios = result.round_ratios()
    _, _, lh, lw = result.latents
    tokens = (lh // 2) * (lw // 2)
    hidden = args.heads * HEAD_DIM
    timed = args.rounds * args.steps
    if setup.device.type == "cuda":
        precision = "bfloat16 weights, bf16 autocast (`train.mixed_precision: bf16`), LoRA in float32"
    else:
        precision = "float32 (`train.mixed_precision: no`)"
    command = "python scripts/bench_train.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "write" and v != DEFAULTS[k]
    )
    extra = result.breakdown
    extra_ms = {k: v * 1000 for k, v in extra.items()}
    host = sum(extra.values())
    verdict = "within" if ratio <= TARGET else "above"
    end_load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    diff = f_med - b_med
    spread = (max(ratios) - min(ratios)) / 2
    if abs(ratio - 1) <= spread:
        rest = (
            f"The medians differ by {diff * 1000:+.0f} ms, less than the rounds' spread "
            f"(+-{spread * 100:.1f}%): at this size flowtune's own work is below what this machine resolves."
        )
    else:
        rest = (
            f"The medians differ by {diff * 1000:+.0f} ms; what these timers do not cover is flowtune's "
            "other per-step Python work (Accelerate's optimizer wrapper, the schedule, the caption-dropout "
            "multiply) and the machine's noise."
        )
    lines = [
        SECTION,
        "",
        "Measured by `scripts/bench_train.py`; re-run it to refresh this section",
        f"(`{command} --write docs/performance.md`; {wall / 60:.1f} min here). Machine: {machine}, at the "
        f"end {end_load}.",
        "",
        "flowtune's `Trainer.train_step` (what `Trainer.train` calls per step: data fetch from the cache, "
        "per-sample generators, `FlowMatchingPipeline.step`, Accelerate's backward, gradient clipping, AdamW "
        "and the schedule) against a bare hand-written loop in the same process: the same transformer "
        "loaded from the same folder, peft LoRA on the same targets, one cached batch held on the device, "
        "sigma = shift(sigmoid(randn)), noise, x_t, 2x2 packing, ids, forward, unpacking, MSE weighted by "
        "1 + 3 sigma, backward, `clip_grad_norm_`, `torch.optim.AdamW` with the recipe's hyper-parameters, "
        "`zero_grad`.",
        "",
        f"Model: a FLUX-shaped `FluxTransformer2DModel` with random weights, {args.double} double + "
        f"{args.single} single blocks, hidden {hidden} ({args.heads} heads of {HEAD_DIM}), "
        f"{setup.parameters / 1e6:.1f}M parameters; LoRA rank {LORA_RANK}, alpha {LORA_ALPHA} on flowtune's "
        f"FLUX.1 targets ({result.trainable / 1e6:.2f}M trainable). Batch {args.batch} of {lh}x{lw} "
        f"latents ({args.image} px, {tokens} image tokens) with {result.text_tokens} text tokens; {precision}. "
        f"After {WARMUP} warm-up steps each, the two took turns for {args.rounds} rounds of {args.steps} "
        f"steps each (the order alternating), {timed} timed steps per side, each timed on its own.",
        "",
        "| per step | median | best |",
        "| --- | --- | --- |",
        f"| flowtune `train_step` | {f_med * 1000:.0f} ms | {f_best * 1000:.0f} ms |",
        f"| bare loop | {b_med * 1000:.0f} ms | {b_best * 1000:.0f} ms |",
        f"| flowtune / bare | **{ratio:.3f}** | {f_best / b_best:.3f} |",
        "",
        f"flowtune costs **{(ratio - 1) * 100:+.1f}%** per step against the bare loop (ratio of the medians; "
        f"the rounds' own ratios range from {min(ratios):.3f} to {max(ratios):.3f}), {verdict} the target of "
        f"+{(TARGET - 1) * 100:.0f}%. In a separate pass of {result.breakdown_steps} flowtune steps "
        f"({result.breakdown_step_seconds * 1000:.0f} ms each) with timers, the host work the bare loop "
        f"does not do or does more simply took {host * 1000:.2f} ms per step "
        f"({host / result.breakdown_step_seconds * 100:.2f}% of a step): {extra_ms['data']:.2f} ms fetching "
        f"the batch from the cache (DataLoader, memory-mapped shards, collation), {extra_ms['generators']:.2f} "
        f"ms seeding the per-sample generators and {extra_ms['draws']:.2f} ms drawing sigma, noise and the "
        "caption dropout sample by sample (the bare loop draws sigma and noise too, in one call each). "
        + rest,
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--double", type=int, default=DEFAULTS["double"], help="Double-stream blocks.")
    parser.add_argument("--single", type=int, default=DEFAULTS["single"], help="Single-stream blocks.")
    parser.add_argument(
        "--heads", type=int, default=DEFAULTS["heads"], help=f"Attention heads of {HEAD_DIM}."
    )
    parser.add_argument(
        "--image", type=int, default=DEFAULTS["image"], help="Image side in pixels (latents are /8)."
    )
    parser.add_argument(
        "--text-len", type=int, default=DEFAULTS["text_len"], help="data.max_sequence_length (text tokens)."
    )
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="train.batch_size.")
    parser.add_argument(
        "--steps", type=int, default=DEFAULTS["steps"], help="Timed steps per side per round."
    )
    parser.add_argument("--rounds", type=int, default=DEFAULTS["rounds"], help="Rounds of turns.")
    parser.add_argument("--write", type=Path, help="Replace the '## Training step' section of this file.")
    args = parser.parse_args()
    if args.image % 16:
        parser.error("--image must be a multiple of 16 (FLUX.1's granularity)")
    quiet_libraries()
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        setup = build(Path(tmp), args)
        machine = machine_info(setup.device)
        print(f"{shlex.join(sys.argv)}\nmachine: {machine}", flush=True)
        result = bench(setup, args.steps, args.rounds)

    section = render(args, machine, setup, result, time.perf_counter() - started)
    print(section)
    if args.write:
        write_section(args.write, SECTION, section)


if __name__ == "__main__":
    main()
