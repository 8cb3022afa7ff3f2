"""Run a recipe's training step on a model built from its config alone (random or fake weights).

One function, :func:`run_training_steps`, serves both sides of the memory story:

- ``flowtune plan`` runs it on fake tensors (torch's ``FakeTensorMode``: shapes, dtypes and
  storage sizes, no data) under :class:`~flowtune.memory.plan.LiveBytes`, which counts the bytes
  alive, so a 32B model costs seconds and no memory;
- ``scripts/bench_memory.py`` and the plan's tests run it on real tensors (random weights at the
  real shapes: no download), on the CPU or a GPU, with the savers the plan only accounts
  (``model.quantize``, ``train.block_offload``) applied for real, and time each step.

``train.activation_offload`` changes what a step keeps on the device, so both run it: real runs
with the trainer's hooks (:class:`~flowtune.train.activation_offload.ActivationOffload`), fake
runs with the same hooks simulating the copies (no data), so the plan counts what stays.

The step is the trainer's: the family adapter's example batch at the recipe's largest bucket and
``train.batch_size``, ``FlowMatchingPipeline.step`` (the adapter's forward and the loss) under
bf16 autocast when ``train.mixed_precision=bf16`` (as Accelerate wraps the forward), backward,
gradient clipping and the optimizer step; the LoRA is the trainer's (:func:`~flowtune.train.model.
add_lora`), quantization and offload are the trainer's own functions.  On fake tensors only, a
family's ``FamilySpec.plan_forward`` stands in for a transformer forward that reads its inputs'
values, and a clip batch's image-to-video draw is not read back (:func:`_worst_case_task_types`).
"""

from __future__ import annotations

import functools
import time
import types
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch import nn

from flowtune.errors import FlowtuneError
from flowtune.families import FamilySpec


@dataclass
class StepRun:
    """What :func:`run_training_steps` measured (bytes from ``tracker`` when one was given).

    Attributes:
        model: The transformer, LoRA added.
        frozen: Bytes of the frozen weights as built (before any quantization).
        trainable: Bytes of the trainable (LoRA) weights.
        gradients: Bytes of their gradients.
        optimizer: Bytes of the optimizer states.
        peak: The tracker's peak during the last step (0 without a tracker).
        width, height: The bucket the batch was made at (pixels).
        references: Reference images per sample (edit families).
        seconds: Wall time of each step (device-synchronised).
        device_peak: ``torch.cuda.max_memory_allocated`` over the steps on CUDA, else None.
        host_activations: With ``train.activation_offload``, the most bytes of saved
            activations held in CPU memory at once (pinned on CUDA); else 0.
    """

    model: nn.Module
    frozen: int = 0
    trainable: int = 0
    gradients: int = 0
    optimizer: int = 0
    peak: int = 0
    width: int = 0
    height: int = 0
    references: int = 0
    seconds: list[float] = field(default_factory=list)
    device_peak: int | None = None
    host_activations: int = 0

    def counts(self) -> dict[str, int]:
        """The byte counts and the bucket as a mapping (what the plan reads)."""
        return {
            "frozen": self.frozen,
            "trainable": self.trainable,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "peak": self.peak,
            "width": self.width,
            "height": self.height,
            "references": self.references,
            "host_activations": self.host_activations,
        }


def recipe_resolutions(recipe: Any) -> list[int]:
    """``data.resolution`` as a list of ints (it may be one number)."""
    value = recipe.data.resolution
    return [int(value)] if isinstance(value, int | float | str) else [int(r) for r in value]


def recipe_frames(recipe: Any, spec: FamilySpec) -> int:
    """Frames per training clip that a plan sizes a step for: ``data.frames`` with its default
    (:func:`flowtune.data.video.resolve_frames`; 1 for image families)."""
    from flowtune.data.video import resolve_frames

    return resolve_frames(spec, recipe.data.frames)


def validation_frames(recipe: Any, spec: FamilySpec) -> int:
    """Frames per validation (and ``flowtune sample``) clip: ``validation.frames``, else the
    family pipeline's default ``num_frames`` (1 for image families)."""
    if spec.frame_granularity == 0:
        return 1
    if recipe.validation.frames is not None:
        return int(recipe.validation.frames)
    from flowtune.sample import pipeline_frames

    return pipeline_frames(spec)


def largest_bucket(resolutions: list[int], granularity: int, step: int | None) -> tuple[int, int]:
    """(width, height) of the bucket with the most pixels among those of every resolution."""
    from flowtune.data.buckets import make_buckets

    buckets = [b for r in resolutions for b in make_buckets(r, granularity, step=step)]
    best = max(buckets, key=lambda b: (b.area, -abs(b.width - b.height)))
    return best.width, best.height


def recipe_bucket(recipe: Any, spec: FamilySpec) -> tuple[int, int]:
    """(width, height) of the recipe's largest bucket, at the granularity of the model's sides
    (:meth:`flowtune.encoders.FamilyEncoder.granularity_for` its VAE config, a local folder's or
    the bundled one of a Hub id: Wan 2.2 TI2V's sides are multiples of 32, other Wan's 16)."""
    from flowtune.memory.phases import component_config

    granularity = spec.load_encoder_class().granularity_for(
        spec, component_config(recipe.model.pretrained, "vae")
    )
    return largest_bucket(recipe_resolutions(recipe), granularity, recipe.data.bucket_step)


def build_model(spec: FamilySpec, config: dict[str, Any], dtype: torch.dtype, device: str) -> nn.Module:
    """The family's transformer from ``config`` with random weights (patched as training patches
    it: ``FamilySpec.patch_transformer``), built directly in ``dtype`` on ``device`` (fake modules
    cannot be moved with ``.to()``; building on a GPU also initialises there, in seconds for 32B
    parameters), frozen, in train mode."""
    import diffusers

    cls = getattr(diffusers, spec.transformer_class)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    finally:
        torch.set_default_dtype(previous)
    spec.patch_transformer(model)
    model.requires_grad_(False)
    model.train()
    return model


def _worst_case_task_types(
    flow: Any, data_type: str, batch_size: int, generator: Any = None
) -> tuple[str, torch.Tensor | None]:
    """``FlowMatchingPipeline.sample_task_types`` without reading its draw back, which fake
    tensors cannot: the per-sample image-to-video mask drawn as training draws it, and the
    batch's task type the worst case, "i2v" whenever ``flow.i2v_prob`` is above 0."""
    if data_type != "video":
        return "t2v", None
    from flowtune.flow_matching import rng

    mask = rng.rand(batch_size, generator, "cpu") < flow.i2v_prob
    return ("i2v" if flow.i2v_prob > 0 else "t2v"), mask


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_training_steps(
    recipe: Any,
    spec: FamilySpec,
    config: dict[str, Any],
    *,
    fake: bool = True,
    device: str = "cpu",
    savers: bool = False,
    steps: int = 2,
    tracker: Any = None,
    on_model: Any = None,
    after_steps: Any = None,
) -> StepRun:
    """Build the recipe's model from ``config`` and run ``steps`` training steps on it.

    Args:
        recipe: The resolved recipe (``model``, ``lora``, ``data``, ``train``, ``flow``,
            ``optimizer``).
        config: The transformer's ``config.json``.
        fake: Run on fake tensors (the plan); False: real random weights.
        device: Where to build and run (fake runs: ``cpu``).
        savers: Apply ``model.quantize`` and ``train.block_offload`` for real (real runs only).
        steps: Steps to run; the optimizer makes its states in the first, so the last of two or
            more is every later step.  On CUDA, the device's peak is reset after the first.
        tracker: A :class:`~flowtune.memory.plan.LiveBytes` (or any context manager with
            ``current``, ``peak`` and ``reset_peak()``) entered around everything.
        on_model: Called with the model once it is ready to run (LoRA added, gradient
            checkpointing and offload set), before the first step: e.g. to register hooks.
        after_steps: Called as ``after_steps(model, flow, autocast)`` after the last step, still
            under the fake mode and ``tracker``, with the optimizer states alive and the
            gradients freed (as between training steps): e.g. to trace a sampling forward.

    Raises:
        FlowtuneError: a recipe the run does not cover (``train.mode`` other than lora).
    """
    from omegaconf import OmegaConf

    from flowtune.flow_matching import create_pipeline
    from flowtune.train.model import add_lora
    from flowtune.train.optim import build_optimizer

    if recipe.train.mode != "lora":
        raise FlowtuneError("flowtune plan covers train.mode=lora only for now; set train.mode=lora")
    if fake and savers:
        raise ValueError("savers run on real tensors only")
    dtype = getattr(torch, recipe.model.dtype)
    width, height = recipe_bucket(recipe, spec)
    references = 1 if spec.reference_images and spec.uses_edit_pairs(recipe.data.edit_pairs) else 0
    flow = create_pipeline(
        spec.adapter, OmegaConf.to_container(recipe.model.adapter), **OmegaConf.to_container(recipe.flow)
    )
    if fake:
        flow.sample_task_types = functools.partial(_worst_case_task_types, flow)
    optimizer_cfg = recipe.optimizer
    if fake and optimizer_cfg.name != "adamw":  # optional packages' optimizers do not run on fake tensors
        optimizer_cfg = OmegaConf.merge(optimizer_cfg, {"name": "adamw"})
    device_type = torch.device(device).type
    autocast = recipe.train.mixed_precision == "bf16"
    on_cuda = device_type == "cuda" and not fake

    fake_mode = None
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode()
        fake_mode.__enter__()
    counting = tracker if tracker is not None else nullcontext()
    try:
        with counting:
            model = build_model(spec, config, dtype, device)
            run = StepRun(model=model, width=width, height=height, references=references)
            run.frozen = tracker.current if tracker is not None else 0
            if savers and recipe.model.quantize is not None:
                from flowtune.memory.quantize import quantize_linears

                model.flowtune_quantized = quantize_linears(model, recipe.model.quantize, spec.quantize_skip)
            # peft moves each new LoRA layer to its base layer's device and dtype with
            # Module.to(), which fake modules refuse; they are made where the model is already,
            # and add_lora casts them to float32 as training does.
            patch = mock.patch.object(nn.Module, "to", lambda self, *a, **k: self) if fake else nullcontext()
            with patch, torch.device(device):
                params = add_lora(
                    model,
                    spec,
                    rank=recipe.lora.rank,
                    alpha=recipe.lora.alpha,
                    dropout=recipe.lora.dropout,
                    target_modules=list(recipe.lora.target_modules) if recipe.lora.target_modules else None,
                )
            run.trainable = sum(p.untyped_storage().nbytes() for p in params)
            if recipe.train.gradient_checkpointing:
                model.enable_gradient_checkpointing()
            if savers and recipe.train.block_offload is not None:
                from flowtune.train.offload import offload_blocks

                offload_blocks(model, spec, recipe.train.block_offload, torch.device(device))
            if fake and (plan_forward := spec.load_plan_forward()) is not None:
                model.forward = types.MethodType(plan_forward, model)
            if recipe.train.activation_offload:
                from flowtune.train.activation_offload import ActivationOffload

                activations = ActivationOffload(device, simulate=fake).install(model)
            if on_model is not None:
                on_model(model)
            optimizer = build_optimizer(params, optimizer_cfg)
            with torch.device(device):
                batch = flow.model_adapter.example_batch(
                    config,
                    recipe.train.batch_size,
                    height,
                    width,
                    recipe.data.max_sequence_length,
                    references,
                    frames=recipe_frames(recipe, spec),
                )
            max_norm = recipe.train.max_grad_norm if recipe.train.max_grad_norm > 0 else float("inf")
            for index in range(steps):
                if tracker is not None:
                    tracker.reset_peak()
                if on_cuda and index == 1:
                    torch.cuda.reset_peak_memory_stats(device)
                _synchronize(device)
                start = time.perf_counter()
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
                    _, loss, _, _ = flow.step(
                        model, batch, device=device, dtype=dtype, collect_metrics=False, check_loss=False
                    )
                loss.backward()
                del loss
                run.gradients = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
                torch.nn.utils.clip_grad_norm_(params, max_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                _synchronize(device)
                run.seconds.append(time.perf_counter() - start)
            run.optimizer = sum(
                t.untyped_storage().nbytes()
                for state in optimizer.state.values()
                for t in state.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0
            )
            if tracker is not None:
                run.peak = tracker.peak
            if recipe.train.activation_offload:
                run.host_activations = activations.host_peak
            if on_cuda:
                run.device_peak = torch.cuda.max_memory_allocated(device)
            del batch
            if after_steps is not None:
                after_steps(model, flow, torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast))
    finally:
        if fake_mode is not None:
            fake_mode.__exit__(None, None, None)
    return run
