"""Validation during training: images from the model being trained, and a held-out loss.

Every ``validation.every`` steps and after the last step, :class:`Validator` does two things:

* **Images.**  ``validation.prompts`` are sampled by the family's diffusers pipeline built around
  the in-memory transformer (LoRA active), with the prompt embeddings that preprocess cached, so
  the text encoders are never loaded during training, except for families whose prompt
  embeddings depend on the reference images (``FamilyEncoder.text_uses_references``): their
  pipeline is loaded with its text encoders (quantized per ``model.encoder_quantize``; on the
  accelerator only while sampling, in CPU memory between validations) and encodes each prompt
  and the negative prompt with the prompt's ``validation.images``.  They are written by
  :class:`flowtune.sample.SampleWriter` to ``OUTPUT/samples/step-NNNNNN/`` (images, a grid and
  ``samples.jsonl``) and sent to the trackers.  The main process samples; the others wait.
* **Validation loss.**  The held-out items (``data.validation_split``) are evaluated at the fixed
  noise levels :data:`VAL_SIGMAS`, each item with its own fixed noise (seeded by
  ``validation.seed`` and the item's key), without loss weighting or caption dropout
  (:meth:`FlowMatchingPipeline.evaluate`): ``val_loss`` depends only on the weights and the
  held-out data, so it is comparable between steps, runs and recipes with different ``flow.*``
  settings.  The items are shared out among the processes and the sum is reduced.  A pipeline
  that samples sigma within a range (``flow.sigma_range``; one expert of a two-expert model) is
  evaluated at the levels within it (:func:`validation_sigmas`).

Validation leaves training exactly as it was (:func:`training_state_kept`): the modules' train/eval
flags, torch's CPU and CUDA random states, and the weights (no gradients are taken), so a run with
validation has the same training losses as one without.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flowtune.data.loader import CacheCollator, CachedDataset
from flowtune.data.store import CacheStore
from flowtune.errors import FlowtuneError
from flowtune.experts import SECOND_TRANSFORMER, expert_component
from flowtune.families import FamilySpec
from flowtune.flow_matching import rng
from flowtune.flow_matching.adapters.base import unwrap_model
from flowtune.sample import (
    SampleJob,
    SampleSettings,
    SampleWriter,
    frame_strip,
    generate_frames,
    load_pipeline,
    load_references,
    pair_references,
)
from flowtune.train.checkpoint import checkpoint_name

# The noise levels of the validation loss (sigma = 1 is pure noise): fixed, so that val_loss
# curves of different runs can be compared.
VAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)
SAMPLES_DIR = "samples"


def validation_sigmas(flow: Any) -> tuple[float, ...]:
    """The :data:`VAL_SIGMAS` within ``flow.sigma_range`` (the noise levels a run restricted to a
    range trains on; all of them when none falls inside), else all."""
    bounds = getattr(flow, "sigma_range", None)
    inside = tuple(s for s in VAL_SIGMAS if bounds is None or bounds[0] <= s <= bounds[1])
    return inside or VAL_SIGMAS


def _on_device(value: Any, device: torch.device) -> Any:
    """A cached prompt input (:meth:`FamilyEncoder.prompt_inputs`) on ``device``: a tensor, or a
    list of tensors (per-prompt embeddings of different lengths, for pipelines that take them so);
    a text prompt (families that encode it when sampling) as it is."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return type(value)(v.to(device) for v in value)
    return value.to(device)


def validation_seed(seed: int, key: str) -> int:
    """A 63-bit seed for a held-out item's noise, from ``validation.seed`` and its cache key."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def training_state_kept(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the body in eval mode without gradients, then restore every module's train/eval flag
    and torch's random states (CPU, and the current CUDA device), whatever the body did."""
    flags = [(module, module.training) for module in model.modules()]
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            yield
    finally:
        for module, training in flags:
            module.training = training


class Validator:
    """Validation images and loss of one training run.

    Args:
        recipe: The run's recipe (``validation.*``, ``model.*``, ``train.batch_size``).
        spec: The model family.
        store: The open preprocess cache (validation prompt embeddings, held-out items).
        heldout_indices: Manifest indices of the held-out items (may be empty).
        accelerator: The run's Accelerator.
        output_dir: ``train.output_dir``.
    """

    def __init__(
        self,
        recipe: Any,
        spec: FamilySpec,
        store: CacheStore,
        heldout_indices: list[int],
        accelerator: Any,
        output_dir: Path,
    ):
        v = recipe.validation
        self.recipe = recipe
        self.spec = spec
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.prompts = list(v.prompts)
        self.every = int(v.every)
        self.dtype = getattr(torch, recipe.model.dtype)
        self.heldout = CachedDataset(store, heldout_indices)
        self.collate = CacheCollator(self.heldout.sequence_fields)
        self.encoder_class = spec.load_encoder_class()
        # The pipeline encodes the prompts (with their references) when nothing could be cached.
        self.encodes_prompts = self.encoder_class.text_uses_references
        self.settings = SampleSettings(
            seed=v.seed, steps=v.steps, guidance=v.guidance, guidance_2=v.guidance_2, height=v.height, width=v.width,
            negative_prompt=v.negative_prompt, frames=v.frames,
            fps=round(recipe.data.fps) if recipe.data.fps is not None else None,  # as trained
            max_sequence_length=recipe.data.max_sequence_length,  # for prompts the pipeline encodes
        )  # fmt: skip
        self._clips: list[list[Any]] = []  # the last validation's clips (video families), for the trackers
        # Video families sample clips (an MP4 and a frame strip each) at the family's frame rate.
        self.fps = self.settings.frame_rate(spec)
        if self.encodes_prompts:  # generate() adds the negative prompt to a text prompt
            self._prompt_inputs = [{"prompt": p} for p in self.prompts]
        else:
            negative = {}
            negative_prompt = spec.cached_negative_prompt(v.negative_prompt)
            if self.prompts and negative_prompt is not None:  # its cached embeddings, as preprocess made them
                negative = self.encoder_class.negative_inputs(self.heldout.prompt_embeddings(negative_prompt))
            self._prompt_inputs = [
                {**self.encoder_class.prompt_inputs(self.heldout.prompt_embeddings(p)), **negative}
                for p in self.prompts
            ]
        # Image-editing families: each prompt's reference image (checked now, read when sampling).
        self.references = (
            pair_references(
                spec, self.prompts, list(v.images), (v.width, v.height), recipe.data.control_resize
            )
            if self.prompts
            else None
        )
        if self.references is not None and spec.first_frame_images:
            self._check_first_frame_model()
        if self.prompts and v.guidance_2 is not None:  # refused now, not after training steps
            from flowtune.experts import boundary_ratio
            from flowtune.model_files import resolve_pretrained

            m = recipe.model
            boundary_ratio(resolve_pretrained(m.pretrained, m.revision, []), "validation.guidance_2")
        self._pipe: Any = None
        self._others: list[str] = []  # the pipeline's frozen experts (model.expert: high | low)

    def _check_first_frame_model(self) -> None:
        """``validation.images`` are first frames (``FamilySpec.first_frame_images``): refuse them
        now, before training, when the model is a text-to-video checkpoint (its folder's pipeline
        class is the family's text-to-video ``pipeline_class``), which takes none."""
        from flowtune.model_files import read_pipeline_class, resolve_pretrained

        m = self.recipe.model
        model_dir = resolve_pretrained(m.pretrained, m.revision, [])
        class_name = read_pipeline_class(model_dir)
        if self.encoder_class.pipeline_class_name(self.spec, model_dir, True) == self.spec.pipeline_class:
            raise FlowtuneError(
                f"validation.images: {m.pretrained} is a text-to-video model ({class_name}); first frames "
                "need an image-to-video checkpoint of the family. Use validation.images=[]"
            )

    @property
    def enabled(self) -> bool:
        """Whether there is anything to validate (prompts or held-out items)."""
        return bool(self.prompts) or len(self.heldout) > 0

    def due(self, step: int, last: bool) -> bool:
        """Whether to validate after ``step``."""
        return self.enabled and (last or (self.every > 0 and step % self.every == 0))

    def describe(self) -> str:
        """One line for the run's banner."""
        parts = []
        if self.prompts:
            parts.append(
                f"{len(self.prompts)} prompt{'s' if len(self.prompts) != 1 else ''} "
                f"({self.settings.width}x{self.settings.height}, {self.settings.steps} steps)"
            )
        if len(self.heldout):
            parts.append(f"val_loss on {len(self.heldout)} held-out items x {len(VAL_SIGMAS)} sigmas")
        when = f"every {self.every} steps and at the end" if self.every > 0 else "at the end"
        return f"{', '.join(parts)}; {when}"

    # ------------------------------------------------------------------ the loss

    @torch.no_grad()
    def loss(self, flow: Any, model: nn.Module, device: torch.device) -> float | None:
        """The mean validation loss over the held-out items and :data:`VAL_SIGMAS` (all processes
        must call it; None when nothing is held out)."""
        acc = self.accelerator
        n = len(self.heldout)
        if n == 0:
            return None
        # Under FSDP every forward pass is a collective, so every process evaluates every item
        # (the same calls everywhere, the same mean); otherwise each takes its share.
        split = acc.num_processes > 1 and not acc.is_fsdp2
        mine = list(range(acc.process_index, n, acc.num_processes)) if split else list(range(n))
        groups = self.heldout.batch_groups  # items that stack into one batch (bucket, control sizes)
        by_bucket: dict[Any, list[int]] = {}
        for i in mine:
            by_bucket.setdefault(groups[i], []).append(i)
        batch_size = self.recipe.train.batch_size
        total = torch.zeros((), device=device, dtype=torch.float64)
        count = torch.zeros((), device=device, dtype=torch.float64)
        for indices in by_bucket.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch = self.collate([self.heldout[i] for i in chunk])
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                generators = [
                    torch.Generator().manual_seed(validation_seed(self.settings.seed, key))
                    for key in batch["keys"]
                ]
                shape = (
                    batch["image_latents"].shape if "image_latents" in batch else batch["video_latents"].shape
                )
                for sigma in validation_sigmas(flow):
                    noise = rng.randn(shape, generators, device)
                    sigmas = torch.full((len(chunk),), sigma, device=device)
                    with acc.autocast():
                        losses = flow.evaluate(model, batch, sigmas, noise, device=device, dtype=self.dtype)
                    total += losses.double().sum()
                    count += len(chunk)
        if split:
            total = acc.reduce(total, "sum")
            count = acc.reduce(count, "sum")
        return float(total / count)

    # ------------------------------------------------------------------ the images

    def _pipeline(self, model: nn.Module, device: torch.device) -> Any:
        if self._pipe is None:
            from flowtune.model_files import resolve_pretrained

            m = self.recipe.model
            text = list(self.encoder_class.text_components) if self.encodes_prompts else []
            # A two-expert model (model.expert) samples with both: the trained one in its slot,
            # the other (frozen, quantized as training's, streamed as training's) loaded from the
            # model folder by frozen_expert.
            trained = unwrap_model(model)
            both = getattr(trained, "pipeline_components", None)  # model.expert=both: TwoExperts
            trained_as = expert_component(m.expert)
            others = (
                []
                if m.expert in (None, "both")
                else sorted({"transformer", SECOND_TRANSFORMER} - {trained_as})
            )
            model_dir = resolve_pretrained(m.pretrained, m.revision, ["vae", "scheduler", *text, *others])
            self._pipe = load_pipeline(
                self.spec,
                model_dir,
                dtype=self.dtype,
                device=device,
                variant=m.variant,
                transformer=both()["transformer"] if both else trained,
                without=(() if self.encodes_prompts else self.encoder_class.text_components)
                + ((SECOND_TRANSFORMER,) if both else tuple(others)),
                encoder_quantize=m.encoder_quantize if self.encodes_prompts else None,
                first_frames=self.references is not None and self.spec.first_frame_images,
                trained_as=trained_as,
            )
            if both:  # the second trained expert, already on the device
                self._pipe.register_modules(**{SECOND_TRANSFORMER: both()[SECOND_TRANSFORMER]})
            for name in others:
                self._pipe.register_modules(
                    **{name: frozen_expert(self.spec, model_dir, name, self.recipe, device)}
                )
            self._others = others
        return self._pipe

    def _frozen_to(self, device: torch.device | str) -> None:
        """Move the pipeline's frozen components that training does not use (the text encoders
        when validation encodes its prompts, a one-expert run's other expert: its resident part
        when it streams its blocks) to ``device``: onto the accelerator for sampling, back to CPU
        memory for training, so that training steps never share the GPU with them."""
        from flowtune.train.offload import move_resident

        if self.encodes_prompts:
            self._text_encoders_to(device)
        for name in self._others:
            move_resident(getattr(self._pipe, name), device)

    def _text_encoders_to(self, device: torch.device | str) -> None:
        """Move the pipeline's text encoders (loaded only when validation encodes its prompts) to
        ``device`` (:meth:`_frozen_to`)."""
        for name in self.encoder_class.text_components:
            module = getattr(self._pipe, name, None)
            if isinstance(module, nn.Module):
                module.to(device)

    def images(self, model: nn.Module, step: int, device: torch.device, write: bool = True) -> list[Any]:
        """Sample the validation prompts into ``OUTPUT/samples/step-NNNNNN/`` (``write=False``: only
        take part in the sampling, as FSDP needs every process to); returns the PIL images (a video
        family's: each clip's frame strip)."""
        self._clips = []
        if not self.prompts:
            return []
        pipe = self._pipeline(model, device)
        self._frozen_to(device)
        try:
            return self._sample(pipe, step, device, write)
        finally:
            self._frozen_to("cpu")

    def _sample(self, pipe: Any, step: int, device: torch.device, write: bool) -> list[Any]:
        """:meth:`images` with the pipeline ready on ``device``."""
        out_dir = self.output_dir / SAMPLES_DIR / checkpoint_name(step)
        if write:
            shutil.rmtree(out_dir, ignore_errors=True)  # the same step sampled again (a resumed run)
        info = {"family": self.spec.name, "model": self.recipe.model.pretrained, "step": step}
        writer = SampleWriter(out_dir, info) if write else None
        images = []
        for i, (prompt, inputs) in enumerate(zip(self.prompts, self._prompt_inputs, strict=True)):
            inputs = {k: _on_device(v, device) for k, v in inputs.items()}
            refs: tuple[str, ...] = ()
            if self.references is not None:
                refs = self.references[i]
                inputs.update(
                    self.encoder_class.reference_inputs(
                        pipe,
                        load_references(refs),
                        self.settings.height,
                        self.settings.width,
                        self.recipe.data.control_resize,
                    )
                )
            job = SampleJob(prompt, self.settings.seed, inputs, refs)
            with self.accelerator.autocast():
                frames = generate_frames(pipe, job, self.settings, self.spec)
            if writer is not None:
                writer.add_sample(frames, job, self.settings, self.fps)
            images.append(frames[0] if self.fps is None else frame_strip(frames))
            if self.fps is not None:
                self._clips.append(frames)
        if writer is not None:
            writer.write_grid()
        return images

    def log_images(self, images: list[Any], step: int) -> None:
        """Send the images to the trackers (TensorBoard: one NHWC batch; W&B: a list).  A video
        family's clips also go to TensorBoard as animated images (``validation_clips/K``), played
        at the clips' frame rate (:func:`tensorboard_clip`)."""
        if not images:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images(
                    {"validation": np.stack([np.asarray(i.convert("RGB")) for i in images])},
                    step,
                    dataformats="NHWC",
                )
                for k, clip in enumerate(self._clips):
                    # SummaryWriter.add_video encodes with moviepy, which flowtune does not
                    # install; the same animated-GIF image summary, encoded by Pillow.
                    tracker.writer._get_file_writer().add_summary(
                        tensorboard_clip(f"validation_clips/{k}", clip, self.fps), step
                    )
            elif tracker.name == "wandb":
                tracker.log_images({"validation": images}, step)

    # ------------------------------------------------------------------ both

    def run(self, flow: Any, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """Validate after ``step`` (all processes call it).

        Returns:
            ``val_loss`` when there is a held-out set; on the main process ``samples`` (the
            images' folder), or ``warning`` when the images ran out of memory and were skipped
            (training goes on).
        """
        acc = self.accelerator
        result: dict[str, Any] = {}
        with training_state_kept(unwrap_model(model), device):
            val_loss = self.loss(flow, unwrap_model(model), device)
            if val_loss is not None:
                result["val_loss"] = val_loss
            if acc.is_main_process or acc.is_fsdp2:  # sharded: every process runs the sampler
                try:
                    images = self.images(model, step, device, write=acc.is_main_process)
                except torch.OutOfMemoryError:
                    # A long run is not lost to a validation image: skip it, free what it took.
                    images = []
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    result["warning"] = (
                        f"validation images of step {step} skipped: out of memory on {device} "
                        "(lower validation.height/width, or train.gradient_checkpointing frees memory)"
                    )
                if not acc.is_main_process:
                    images = []
                self.log_images(images, step)
                if images:
                    result["samples"] = str(self.output_dir / SAMPLES_DIR / checkpoint_name(step))
        acc.wait_for_everyone()
        return result


def frozen_expert(
    spec: FamilySpec,
    model_dir: Path,
    component: str,
    recipe: Any,
    device: torch.device,
    *,
    strict: bool = False,
) -> nn.Module:
    """The other expert of a one-expert run (``model.expert: high | low``), for validation
    clips: ``model_dir/component`` loaded as the trained one was (:func:`load_transformer`:
    ``model.dtype``, ``model.variant``, ``model.quantize`` layer by layer on ``device``), frozen,
    in eval mode.

    With ``train.block_offload: N`` it streams as the trained expert does: its last N blocks and
    everything outside the blocks sit on ``device``, the other blocks' weights in pinned CPU
    memory, copied in just before each block's forward (:func:`offload_blocks`; its backward
    hooks never fire under ``torch.no_grad()``), so validation adds only its resident part to the
    GPU, never the whole expert.  Without it, the whole expert goes to ``device``.  Either way the
    numbers are those of the expert loaded whole: pixels do not depend on the streaming.  The
    validator parks it in CPU memory between validations (:func:`move_resident`).

    Args:
        component: ``transformer`` or ``transformer_2`` (the expert not trained).
        strict: See :class:`flowtune.train.offload.BlockOffload` (tests).
    """
    from flowtune.train.model import load_transformer
    from flowtune.train.offload import offload_blocks, quantized_host_blocks

    m, resident = recipe.model, recipe.train.block_offload
    host = quantized_host_blocks(spec, model_dir, m.quantize, resident)
    dtype = getattr(torch, m.dtype)
    expert = load_transformer(spec, model_dir, dtype, m.variant, m.quantize, device, host, component)
    expert.eval()
    if resident is None:
        return expert.to(device)
    offload_blocks(expert, spec, resident, device, strict=strict)
    return expert


def tensorboard_clip(tag: str, frames: list[Any], fps: int) -> Any:
    """A TensorBoard image summary of a clip as an animated GIF (what ``SummaryWriter.add_video``
    writes, which TensorBoard's image dashboard plays): ``frames`` (PIL images of one size) at
    ``fps`` frames per second, looping."""
    import io

    from tensorboard.compat.proto.summary_pb2 import Summary

    buffer = io.BytesIO()
    first, *rest = [frame.convert("RGB") for frame in frames]
    first.save(buffer, format="GIF", save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
    image = Summary.Image(
        height=first.height, width=first.width, colorspace=3, encoded_image_string=buffer.getvalue()
    )
    return Summary(value=[Summary.Value(tag=tag, image=image)])
