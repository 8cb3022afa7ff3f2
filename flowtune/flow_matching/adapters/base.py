"""The adapter interface between the model-agnostic pipeline and one model family.

The pipeline owns the flow-matching math (timesteps, noising, target, loss); an adapter owns how
one family's transformer is called: how latents are laid out, which conditioning tensors it takes,
and how its output maps back to the latent space the loss is computed in.
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass
class FlowMatchingContext:
    """Everything an adapter needs to build its model inputs for one step.

    Attributes:
        noisy_latents: x_t, [B, C, H, W] (image) or [B, C, F, H, W] (video), in ``dtype``.
        latents: Clean latents x_0, same shape as ``noisy_latents``.
        timesteps: [B] float, sigma * num_train_timesteps (in [0, num_train_timesteps]).
        sigma: [B] float32 noise level, 1 = pure noise, 0 = data.
        task_type: "t2v" or "i2v".
        data_type: "image" or "video".
        device: Device of the model inputs.
        dtype: Compute dtype of the model inputs.
        batch: The original batch dictionary (model-specific conditioning lives there).
        cfg_dropout_prob: Probability of dropping a sample's text conditioning.  Adapters use it
            only when ``cfg_dropout_mask`` is None (an adapter called directly, as in the
            reference): each sample is then dropped with this probability, drawn from torch's
            global RNG.  The pipeline sets it to 0 when it passes no mask.
        cfg_dropout_mask: [B] bool, True where the sample's text conditioning is dropped for
            classifier-free guidance training.  Drawn once per sample by the pipeline so that every
            adapter drops consistently; it wins over ``cfg_dropout_prob``.
        i2v_mask: [B] bool, True for the video samples trained image-to-video (conditioned on
            their first frame), drawn per sample by the pipeline; None for images.  ``task_type``
            is "i2v" when any sample is.
    """

    noisy_latents: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor
    sigma: torch.Tensor
    task_type: str
    data_type: str
    device: torch.device
    dtype: torch.dtype
    batch: dict[str, Any]
    cfg_dropout_prob: float = 0.0
    cfg_dropout_mask: torch.Tensor | None = None
    i2v_mask: torch.Tensor | None = None

    @property
    def video_latents(self) -> torch.Tensor:
        """Alias of ``latents`` kept for users of the reference API."""
        return self.latents


@dataclass(frozen=True)
class ExampleSize:
    """The size of an example batch (:meth:`ModelAdapter.example_batch`): ``batch_size`` images of
    ``height x width`` pixels with captions of ``text_tokens`` tokens; for video families, clips of
    ``frames`` frames (1: a still image; image families ignore it)."""

    batch_size: int
    height: int
    width: int
    text_tokens: int
    frames: int = 1


class ModelAdapter(ABC):
    """Model-specific input preparation and forward call for :class:`FlowMatchingPipeline`.

    Subclasses implement :meth:`prepare_inputs` and :meth:`forward`.  ``forward`` must return the
    prediction in the same layout as the clean latents so that the pipeline's loss against the
    velocity target (noise - x_0) is computed element-wise.
    """

    @abstractmethod
    def prepare_inputs(self, context: FlowMatchingContext) -> dict[str, Any]:
        """Build the keyword inputs of the model's forward call from ``context``."""

    @abstractmethod
    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Call ``model`` with ``inputs``; return the velocity prediction shaped like the latents."""

    def example_batch(
        self,
        config: dict[str, Any],
        batch_size: int,
        height: int,
        width: int,
        text_tokens: int,
        references: int = 0,
        frames: int = 1,
    ) -> dict[str, torch.Tensor]:
        """A batch shaped like the preprocess cache's for a model with transformer ``config``
        (its ``config.json``): images of ``height x width`` pixels (clips of ``frames`` frames
        for video families), captions of ``text_tokens`` tokens, ``references`` reference images
        of the same size (``control_latents_k``, shaped like ``image_latents``).  Random values, made with torch's factory functions so that it
        works on fake tensors (``flowtune plan`` traces a training step on it).  The shapes are
        the adapter's :meth:`example_shapes`.

        Raises:
            NotImplementedError: the adapter does not describe its batch (no ``flowtune plan``).
        """
        shapes = self.example_shapes(config, ExampleSize(batch_size, height, width, text_tokens, frames))
        batch = {name: torch.randn(shape) for name, shape in shapes.items()}
        for k in range(references):
            batch[f"control_latents_{k}"] = torch.randn(shapes["image_latents"])
        return batch

    def example_shapes(self, config: dict[str, Any], size: ExampleSize) -> dict[str, tuple[int, ...]]:
        """``{batch key: shape}`` of a cached batch of ``size`` for a transformer ``config``
        (:meth:`example_batch`); ``image_latents`` is the shape reference latents take too.

        Raises:
            NotImplementedError: the adapter does not describe its batch layout.
        """
        raise NotImplementedError(f"{type(self).__name__} does not describe its batch layout")

    def loss_mask(self, context: FlowMatchingContext) -> torch.Tensor | None:
        """Where the step's prediction is trained: a float tensor broadcastable to the latents
        ([B, ...] of the same rank), 0 on elements the model is not asked to predict (e.g. a
        condition frame it is given clean, at timestep 0), 1 elsewhere; the pipeline multiplies it
        into the batch's ``loss_mask``.  Called after :meth:`prepare_inputs` with the same
        context.  Default None: every element is trained."""
        return None

    def post_process_prediction(self, model_pred: Any) -> torch.Tensor:
        """Take the prediction tensor out of a model's return value (tuple or tensor)."""
        if isinstance(model_pred, tuple | list):
            return model_pred[0]
        return model_pred

    def compute_loss(self, model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-element squared error in float32.

        Args:
            model_pred: [B, ...] prediction.
            target: [B, ...] velocity target, same shape.

        Returns:
            [B, ...] float32 per-element loss.
        """
        return nn.functional.mse_loss(model_pred.float(), target.float(), reduction="none")

    def step_context(self, context: FlowMatchingContext, rank: int, layout: str) -> FlowMatchingContext:
        """The start of :meth:`prepare_inputs`: check the latents' rank
        (:func:`check_latent_rank`) and resolve the step's caption dropout
        (:meth:`resolve_cfg_dropout`).

        Args:
            rank, layout: The latents' expected rank and what they are, e.g. ``4`` and
                ``"latents [B, C, H, W]"``, for the error message.
        """
        check_latent_rank(self, context.noisy_latents, rank, layout)
        return self.resolve_cfg_dropout(context)

    @staticmethod
    def i2v_samples(context: FlowMatchingContext) -> torch.Tensor:
        """[B] bool on the context's device: the samples trained image-to-video
        (``context.i2v_mask``; without one, every sample when ``task_type`` is "i2v")."""
        if context.i2v_mask is not None:
            return context.i2v_mask.to(context.device, dtype=torch.bool)
        b = context.noisy_latents.shape[0]
        return torch.full((b,), context.task_type == "i2v", device=context.device)

    @staticmethod
    def text_embeddings(context: FlowMatchingContext, key: str = "text_embeddings") -> torch.Tensor:
        """The batch's sequence text embeddings ``key`` as [B, L, D] on the context's device and
        dtype ([L, D] accepted for a batch of one, as in the reference), caption dropout not yet
        applied (:meth:`apply_cfg_dropout`)."""
        b = context.noisy_latents.shape[0]
        return batched(context.batch[key], 3, key, b).to(context.device, dtype=context.dtype)

    @staticmethod
    def resolve_cfg_dropout(context: FlowMatchingContext) -> FlowMatchingContext:
        """``context`` with the step's caption-dropout decisions in ``cfg_dropout_mask``.

        The pipeline's mask is kept as it is.  Without one, an adapter called directly honours
        ``cfg_dropout_prob`` as the reference's adapters do, but per sample (one draw per sample
        from torch's global RNG on ``context.device``, no host sync), so that all of the
        adapter's text conditionings are dropped for the same samples.  The caller's context is
        not modified.
        """
        if context.cfg_dropout_mask is not None or context.cfg_dropout_prob <= 0:
            return context
        batch_size = context.noisy_latents.shape[0]
        mask = torch.rand(batch_size, device=context.device) < context.cfg_dropout_prob
        return dataclasses.replace(context, cfg_dropout_mask=mask)

    @staticmethod
    def apply_cfg_dropout(condition: torch.Tensor, context: FlowMatchingContext) -> torch.Tensor:
        """Zero the rows of a text-conditioning tensor whose sample is dropped.

        Args:
            condition: [B, ...] conditioning (sequence embeddings [B, L, D] or pooled [B, D]).
            context: Supplies ``cfg_dropout_mask`` ([B] bool) for this step.

        Returns:
            ``condition`` with the dropped samples' rows set to zero (unchanged if no mask).
        """
        mask = context.cfg_dropout_mask
        if mask is None:
            return condition
        keep = (~mask).to(device=condition.device, dtype=condition.dtype)
        return condition * keep.view(-1, *([1] * (condition.ndim - 1)))


def check_latent_rank(adapter: ModelAdapter, latents: torch.Tensor, rank: int, layout: str) -> None:
    """Raise a ValueError naming the adapter and the expected rank unless ``latents.ndim == rank``.

    Args:
        layout: What the latents should be, e.g. "latents [B, C, H, W]".
    """
    if latents.ndim != rank:
        raise ValueError(
            f"{type(adapter).__name__} expects {rank}D {layout}, got {latents.ndim}D latents "
            f"of shape {tuple(latents.shape)}"
        )


def batched(tensor: torch.Tensor, rank: int, name: str, batch_size: int) -> torch.Tensor:
    """``tensor`` with a batch axis: one of rank ``rank - 1`` (a single sample's, e.g. text
    embeddings [L, D] or a pooled embedding [D]) gets a batch axis of 1, as in the reference.

    Raises:
        ValueError: the batch sizes differ (e.g. unbatched conditioning for several samples).
    """
    if tensor.ndim == rank - 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != rank or tensor.shape[0] != batch_size:
        raise ValueError(
            f"batch key {name!r} has shape {tuple(tensor.shape)}, but the latents have {batch_size} "
            f"samples: expected {rank}D with batch size {batch_size} ({rank - 1}D only for a batch of one)"
        )
    return tensor


_CONTROL_KEY = re.compile(r"^control_latents_(\d+)$")


def control_keys(batch: dict[str, Any]) -> list[str]:
    """The batch's reference-latent keys (``control_latents_0``, ``control_latents_1``, ...), in
    reference order ([] for batches without references)."""
    numbered = [(int(m.group(1)), key) for key in batch if (m := _CONTROL_KEY.match(key))]
    return [key for _, key in sorted(numbered)]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying model of a DDP/FSDP/compile wrapper (whose ``config`` an adapter reads)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
