"""Helpers shared by the tests that run the ``flowtune`` command line as a user does."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
# T5 tokens per caption in the learning tests (train_learning_run and their sampling).
LEARNING_SEQUENCE_LENGTH = 32


def flowtune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``python -m flowtune ARGS`` offline in a subprocess; returns the completed process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "flowtune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@dataclass
class Result:
    """What an in-process :func:`cli` run gave: as the process would have, exit status and text."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args: str | Path, cwd: Path = REPO) -> Result:
    """Run ``flowtune ARGS`` through :func:`flowtune.cli.main` in this process, as :func:`flowtune`
    runs it in a subprocess (offline, 200 columns, in ``cwd``) but without starting an interpreter
    and importing torch again: for tests whose subject is a command's exit status or message, not
    the process (signals, launches of several processes and import laziness need :func:`flowtune`).

    As Python would: ``sys.exit(N)`` is status N, an exception that escapes ``main`` prints its
    traceback on stderr with status 1.  The command's consoles are made anew for the run, writing
    to the captured streams; what a command changes of this process (environment, working
    directory, umask, SIGINT/SIGTERM handlers, global random states, Hugging Face logging levels
    and progress bars, Accelerate's state) is put back afterwards.
    """
    from flowtune import cli as commands
    from flowtune.console import make_console

    stdout, stderr = io.StringIO(), io.StringIO()
    with _process_state_restored(), contextlib.ExitStack() as stack:
        os.environ.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
        os.chdir(cwd)
        stack.enter_context(mock.patch.object(sys, "argv", ["flowtune", *map(str, args)]))
        stack.enter_context(contextlib.redirect_stdout(stdout))
        stack.enter_context(contextlib.redirect_stderr(stderr))
        # Made as `python -m flowtune` makes them: on the (non-terminal) streams, 200 columns wide.
        stack.enter_context(mock.patch.object(commands, "out", make_console()))
        stack.enter_context(mock.patch.object(commands, "err", make_console(stderr=True)))
        try:
            commands.main()
            code = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except Exception:
            traceback.print_exc(file=sys.stderr)
            code = 1
    return Result(code, stdout.getvalue(), stderr.getvalue())


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    """Put back what an in-process command may change of this process (see :func:`cli`)."""
    import random

    environ, cwd, argv = dict(os.environ), os.getcwd(), sys.argv
    mask = os.umask(0o022)
    os.umask(mask)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    random_state = random.getstate()
    torch = sys.modules.get("torch")
    torch_state = torch.get_rng_state() if torch is not None else None
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    libraries = [n for n in ("diffusers", "transformers") if f"{n}.utils.logging" in sys.modules]
    levels = {name: logging.getLogger(name).level for name in libraries}
    bars = {name: sys.modules[f"{name}.utils.logging"].is_progress_bar_enabled() for name in libraries}
    accelerate_state = sys.modules.get("accelerate.state")
    accelerate_ready = accelerate_state is not None and bool(accelerate_state.PartialState._shared_state)
    try:
        yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        sys.argv = argv
        os.umask(mask)
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        random.setstate(random_state)
        if torch_state is not None:
            torch.set_rng_state(torch_state)
        if numpy_state is not None:
            numpy.random.set_state(numpy_state)
        for name in libraries:
            logging.getLogger(name).setLevel(levels[name])
            module = sys.modules[f"{name}.utils.logging"]
            if bars[name]:
                module.enable_progress_bar()
            else:
                module.disable_progress_bar()
        accelerate_state = sys.modules.get("accelerate.state")
        if accelerate_state is not None and not accelerate_ready:
            accelerate_state.AcceleratorState._reset_state(reset_partial_state=True)
            accelerate_state.GradientState._reset_state()


def assert_user_error(result: subprocess.CompletedProcess | Result, *fragments: str) -> None:
    """A user error: exit status 2, no traceback, one line on stderr holding every fragment."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    message = result.stderr.strip()
    assert message.count("\n") == 0, f"expected one line, got:\n{message}"
    for fragment in fragments:
        assert fragment in message, message


def wide_tiny_model(family: str, root: Path) -> Path:
    """The tiny pipeline of ``family`` with a transformer as wide as a latent token: hidden size 64
    for FLUX.1 and Kontext (tokens of 16 x 2 x 2 features), 128 for FLUX.2 (32 x 2 x 2).

    A FLUX transformer's prediction is ``proj_out`` of its hidden state, so with hidden 32 it spans
    only part of a token's dimensions and can never fit the velocity; real models (hidden 3072 and
    6144) have no such limit.  The token width is the smallest that has none either.
    """
    import torch

    from flowtune.families.flux.tiny import tiny_flux_transformer
    from flowtune.families.flux2.tiny import tiny_flux2_transformer
    from flowtune.tiny import make_tiny

    model = make_tiny(family, root / f"tiny-{family}")
    torch.manual_seed(0)
    transformer = (
        tiny_flux2_transformer(hidden=128) if family == "flux2" else tiny_flux_transformer(hidden=64)
    )
    shutil.rmtree(model / "transformer")
    transformer.save_pretrained(model / "transformer")
    return model


def save_image(
    path: Path, size: tuple[int, int] = (32, 24), colour: tuple[int, int, int] = (200, 30, 30)
) -> Path:
    """A plain RGB image file (format from the suffix), parent folders created."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write(path: Path, data: str | bytes) -> Path:
    """A file with ``data``, parent folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def tiny_flux_training_env(
    root: Path,
    train: str = "max_steps: 4, seed: 0, mixed_precision: 'no', checkpoint_every: 2, log_every: 1, keep_last: null",
    rest: str = "optimizer: {lr: 1.0e-3}\nlr_scheduler: {name: constant}\n",
) -> Path:
    """The training tests' set-up in ``root``: a tiny FLUX.1 (``tiny-flux/``), 8 shapes in two
    buckets (``dataset/``, 64x64 and 96x64), ``recipe.yaml`` (LoRA rank 4, float32, 16 text tokens,
    ``train: {TRAIN}`` and the ``rest`` of the YAML) and its cache (``cache/``).  Returns
    ``root/recipe.yaml``."""
    from rich.console import Console

    from flowtune.data.preprocess import preprocess
    from flowtune.data.synthetic import make_shapes_dataset
    from flowtune.recipe import load_recipe
    from flowtune.tiny import make_tiny

    model = make_tiny("flux", root / "tiny-flux")
    make_shapes_dataset(root / "dataset", 8, seed=1, sizes=[(64, 64), (96, 64)])
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"model: {{family: flux, pretrained: '{model}', dtype: float32}}\n"
        "lora: {rank: 4, alpha: 4}\n"
        f"data: {{source: '{root / 'dataset'}', cache_dir: '{root / 'cache'}', resolution: 64,"
        " max_sequence_length: 16}\n"
        f"train: {{{train}}}\n" + rest
    )
    preprocess(load_recipe(recipe), console=Console(quiet=True))
    return recipe


def tiny_flux_inputs(seed: int = 0, text_tokens: int = 16) -> dict:
    """Inputs of the tiny FLUX.1 transformer (``flowtune.families.flux.tiny``): 16 image tokens
    of 64 features ([1, 16, 64]), ``text_tokens`` T5 tokens of 32, pooled [1, 32], guidance,
    ``return_dict=False``; image ids on a 4 x 4 grid."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(16, 3)
    ids[:, 1] = torch.arange(16) // 4
    ids[:, 2] = torch.arange(16) % 4
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, text_tokens, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": ids,
        "txt_ids": torch.zeros(text_tokens, 3),
        "return_dict": False,
    }


# Copies of each pair in a learning run's data (see train_learning_run) and the marker in their names.
LEARNING_COPIES = 4
_COPY = "-copy"


def train_learning_run(
    root: Path,
    model: Path,
    family: str,
    data: Path,
    steps: int,
    data_extra: str = "",
    sequence_length: int = LEARNING_SEQUENCE_LENGTH,
    lr: float = 1e-2,
    lora_extra: str = "",
) -> tuple:
    """The learning tests' run: LoRA rank 16 on the pairs in ``data`` at 64 px, always
    conditioned, uniform noise levels, ``steps`` steps at ``lr``, ``sequence_length`` text tokens,
    on one torch thread.  Checks the loss fell by 15% or more.

    Every file in ``data`` is copied :data:`LEARNING_COPIES` - 1 times first, and the batch holds
    all the copies: each step sees every pair 4 times, at independent noise levels.  The LoRA
    learns more per sample so (400 steps of batch 16 leave the sampling check's caption margins
    as wide as 1000 steps of batch 4 did), and a tiny FLUX.1 step costs only ~2x more at batch 16
    than at 4 (the per-operation overhead dominates).  The cache is content-addressed: the copies
    are encoded once.

    Returns:
        The :class:`TrainResult` and the :func:`learning_pairs` of the run's cache.
    """
    import torch
    from rich.console import Console

    from flowtune.data.preprocess import preprocess
    from flowtune.recipe import load_recipe
    from flowtune.train.metrics import read_metrics
    from flowtune.train.trainer import Trainer

    files = [path for path in sorted(data.rglob("*")) if path.is_file()]
    for copy in range(1, LEARNING_COPIES):
        for path in files:
            shutil.copyfile(path, path.with_name(f"{path.stem}{_COPY}{copy}{path.suffix}"))
    pairs = sum(path.suffix == ".txt" for path in files)  # one caption file per pair
    (root / "recipe.yaml").write_text(
        f"model: {{family: {family}, pretrained: '{model}', dtype: float32}}\n"
        f"lora: {{rank: 16, alpha: 16{lora_extra}}}\n"
        f"data: {{source: '{data}', cache_dir: '{root / 'cache'}', resolution: 64,"
        f" max_sequence_length: {sequence_length}{data_extra}}}\n"
        # Always conditioned (no caption dropout), noise levels uniform over [0, 1].
        "flow: {cfg_dropout_prob: 0.0, timestep_sampling: uniform, flow_shift: 1.0}\n"
        f"train: {{output_dir: '{root / 'run'}', max_steps: {steps},"
        f" batch_size: {pairs * LEARNING_COPIES}, seed: 0, mixed_precision: 'no',"
        f" checkpoint_every: {steps}, log_every: {steps // 10}}}\n"
        f"optimizer: {{lr: {lr}, weight_decay: 0.0}}\n"
        "lr_scheduler: {name: constant}\n"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as fast as two at this size, and the numbers do not depend on the cores
    try:
        recipe = load_recipe(root / "recipe.yaml")
        preprocess(recipe, console=Console(quiet=True))
        result = Trainer(recipe, console=Console(quiet=True)).run()
    finally:
        torch.set_num_threads(threads)
    losses = [r["loss"] for r in read_metrics(root / "run" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.85 * losses[0]
    return result, learning_pairs(root / "cache")


def learning_pairs(cache: Path) -> Any:
    """The :class:`CachedDataset` of a learning run's cache without the copies
    (:func:`train_learning_run`): one item per pair, in the cache's order."""
    from flowtune.data.loader import CachedDataset

    items = CachedDataset(cache).items
    return CachedDataset(cache, [i for i, item in enumerate(items) if _COPY not in Path(item["source"]).stem])


def learning_targets(data: Any, field: str = "image_latents") -> tuple[Any, list[str]]:
    """The targets [4, D] (the cached latents ``field``, flattened: ``video_latents`` for video
    families) and the four distinct captions of a learning run's pairs (:func:`learning_pairs`),
    in the cache's order."""
    import torch

    targets = torch.stack([data[i][field] for i in range(len(data))]).flatten(1)
    captions = [data[i]["caption"] for i in range(len(data))]
    assert len(set(captions)) == 4
    return targets, captions


# FLUX.2's blocks share their modulation (shift, scale, gate), computed once from the timestep (and
# guidance).  In a random model the gates are near zero, which mutes every attention and
# feed-forward branch, so LoRAs on those alone hardly move the output; a trained FLUX.2 has open
# gates.  FLUX.2's learning tests (FLUX.2 [dev] and [klein]) also adapt the modulation layers, so
# that the tiny model can open them: ``lora_extra`` of :func:`train_learning_run`.
FLUX2_MODULATION_TOO = (
    ", target_modules: [attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, attn.add_q_proj, attn.add_k_proj,"
    " attn.add_v_proj, attn.to_add_out, ff.linear_in, ff.linear_out, ff_context.linear_in,"
    " ff_context.linear_out, attn.to_qkv_mlp_proj, 'single_transformer_blocks.*.attn.to_out',"
    " double_stream_modulation_img.linear, double_stream_modulation_txt.linear,"
    " single_stream_modulation.linear]"
)


# The LoRA targets of the Qwen-Image learning tests (Qwen-Image and -Edit: ``lora_extra`` of
# :func:`train_learning_run`).  The tiny transformer's output layer (proj_out) maps
# layer-normalised hidden states through one random 64 x 64 matrix, which the default targets leave
# as it is, and a LoRA on the blocks alone brought Qwen-Image's samples only ~10% nearer their
# targets than the empty latent in 200 steps; with proj_out adapted too they land well inside.
# Measured at 200 steps of batch 16 on data seeds 3, 5, 7, 11, 13 and 17: each caption's sample
# nearer its own target than any other by a margin (the other target's mean squared distance / its
# own) of at least 1.06 (1.36 on seed 13).
QWEN_IMAGE_PROJ_OUT_TOO = (
    ", target_modules: [attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, attn.add_q_proj, attn.add_k_proj,"
    " attn.add_v_proj, attn.to_add_out, img_mlp.net.0.proj, img_mlp.net.2, txt_mlp.net.0.proj,"
    " txt_mlp.net.2, proj_out]"
)


def nearest_targets(
    pipeline_class: type,
    model: Path,
    lora_dir: Path,
    targets: Any,
    sample: Callable,
    components: dict[str, Any] | None = None,
) -> list[int]:
    """The learning tests' check: load ``pipeline_class`` from ``model`` with the trained LoRA,
    draw one sample per target with ``sample(pipe, i)`` (a flat [1, D] latent, from the same
    starting noise for every i) and return, per sample, the index of the nearest of ``targets``
    ([N, D], mean squared distance).  A LoRA that learned the data gives ``[0, 1, ..., N-1]``.
    ``components``: pipeline components loaded the family's own way
    (:meth:`flowtune.encoders.FamilyEncoder.pipeline_components`).
    """
    import torch

    pipe = pipeline_class.from_pretrained(model, dtype=torch.float32, **(components or {}))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as train_learning_run: the numbers do not depend on the cores
    try:
        return [int(((sample(pipe, i) - targets) ** 2).mean(dim=1).argmin()) for i in range(len(targets))]
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block (the tiny models gain nothing from
    more: on a busy 2-core machine their spinning only slows the others), put back after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def family_pipeline(family: str, model: Path) -> Any:
    """The family's diffusers pipeline (``FamilySpec.pipeline_class``) from ``model``, in float32,
    progress bars off."""
    import diffusers
    import torch

    from flowtune.families import get_family

    pipe = getattr(diffusers, get_family(family).pipeline_class).from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_context(noisy: Any, sigma: Any, batch: dict, latents: Any = None) -> Any:
    """A :class:`FlowMatchingContext` of an image batch on the CPU in float32, as an adapter-parity
    test builds it from a pipeline's transformer call: ``noisy`` x_t, ``sigma`` [B] (timesteps
    ``sigma * 1000``), the clean ``latents`` (default: ``noisy``, which the adapters do not read)."""
    import torch

    from flowtune.flow_matching import FlowMatchingContext

    return FlowMatchingContext(
        noisy_latents=noisy,
        latents=noisy if latents is None else latents,
        timesteps=sigma * 1000,
        sigma=sigma,
        task_type="t2v",
        data_type="image",
        device=torch.device("cpu"),
        dtype=torch.float32,
        batch=batch,
    )


def transformer_calls(pipe: Any, **call: Any) -> tuple[list[dict], list[Any]]:
    """Run ``pipe(**call)`` and return its transformer's calls: their keyword inputs (tensors
    cloned) and first outputs, in order (for comparing an adapter's inputs with the pipeline's)."""
    import torch

    calls: list[dict] = []
    outputs: list[Any] = []
    pre = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kw.items()}),
        with_kwargs=True,
    )
    post = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    try:
        pipe(**call)
    finally:
        pre.remove()
        post.remove()
    return calls, outputs


@contextlib.contextmanager
def small_reference_areas(area: int = 128 * 128) -> Iterator[None]:
    """Qwen-Image-Edit's reference areas scaled down to ``area`` pixels while the block runs.

    ``QwenImageEditPlusPipeline`` resizes every reference to about 1024 x 1024 pixels for its VAE
    and 384 x 384 for its vision-language prompt (module constants ``VAE_IMAGE_SIZE`` and
    ``CONDITION_IMAGE_SIZE``), whatever the target's size: on a CPU, minutes per test for a tiny
    model.  flowtune's encoder reads the same constants when it runs, so what the tests compare
    is unchanged.  Commands run in this process (:func:`cli`) see the smaller areas too.
    """
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    with mock.patch.multiple(edit_plus, VAE_IMAGE_SIZE=area, CONDITION_IMAGE_SIZE=area):
        yield


def assert_offloaded_blocks_train_the_same_lora(
    spec: Any, model: Path, inputs: dict[str, Any], checkpointing: bool, resident: tuple[int, ...] = (0, 1)
) -> None:
    """``train.block_offload``: 3 LoRA steps of ``spec``'s transformer from ``model`` on
    ``inputs`` (its keyword inputs; loss = mean squared output) give the same losses and LoRA,
    bit for bit, with each count of ``resident`` blocks as without offload, every use of an
    offloaded weight while its block is on the device (strict)."""
    import torch

    from flowtune.train import offload
    from flowtune.train.model import add_lora, load_transformer

    def steps(kept: int | None) -> tuple[list[float], list[Any]]:
        torch.manual_seed(0)
        transformer = load_transformer(spec, model, torch.float32)
        params = add_lora(transformer, spec, rank=4, alpha=4, init="gaussian")
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        if kept is not None:
            offload.offload_blocks(transformer, spec, kept, torch.device("cpu"), strict=True)
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for _ in range(3):
            loss = transformer(**inputs)[0].pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in params]

    losses, lora = steps(None)
    for kept in resident:
        offloaded, offloaded_lora = steps(kept)
        assert offloaded == losses, kept
        assert all(torch.equal(a, b) for a, b in zip(lora, offloaded_lora, strict=True)), kept


def bundled_billions(hub_id: str, component: str, transformer_class: str | None = None) -> float:
    """Billions of parameters of a bundled config (``flowtune plan`` offline), built on the meta
    device (no memory): ``component`` ``transformer`` from the bundled transformer config (which
    must be bundled, of ``transformer_class`` when given), any other from the bundled component
    configs."""
    import diffusers
    import torch

    from flowtune.memory.phases import build_component, component_config
    from flowtune.memory.plan import load_transformer_config

    with torch.device("meta"):
        if component == "transformer":
            config, source = load_transformer_config(hub_id)
            assert source == "bundled", hub_id
            assert transformer_class in (None, config["_class_name"]), config["_class_name"]
            rest = {k: v for k, v in config.items() if not k.startswith("_")}
            model = getattr(diffusers, config["_class_name"]).from_config(rest)
        else:
            model = build_component(component_config(hub_id, component), torch.bfloat16)
    return sum(p.numel() for p in model.parameters()) / 1e9


def allocated_peak(fn) -> int:
    """Run ``fn()`` under torch's profiler and return the peak of the bytes the CPU allocator
    handed out meanwhile (its memory events; independent of flowtune's own counters)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
