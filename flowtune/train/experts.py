"""Training both experts of a two-expert pipeline in one run (``model.expert: both``,
:mod:`flowtune.experts`).

- :class:`TwoExperts` holds the two transformers as one module, so that the trainer's one model,
  optimizer (over both LoRAs) and learning-rate schedule (following the run's step) serve both;
  a call goes to the expert the trainer made active for the step, or (validation loss, sampling
  nothing) to the one whose sigma range holds the call's timesteps.
- :class:`ExpertLoras` is the ``train.mode: lora`` strategy for it: one LoRA per expert, saved as
  two files in each checkpoint: ``pytorch_lora_weights.safetensors`` (the high-noise expert's, the
  file ``load_lora_weights`` loads by default into ``transformer``) and
  ``pytorch_lora_weights_low_noise.safetensors`` (the low-noise expert's, for
  ``load_lora_weights(..., load_into_transformer_2=True)``), each naming its expert in its
  metadata.

Each step trains one expert (:func:`flowtune.experts.expert_for_step`): the other's LoRA gets no
gradient, so AdamW leaves it (and its moments) untouched; under DDP the run sets
``find_unused_parameters`` (every process chooses the same expert, so the other's parameters are
unused on all of them and DDP leaves their gradients empty).  Memory: both experts stay on the GPU
(moving a 14B expert in and out at each switch would cost seconds per step); a GPU that cannot
hold both trains them in two runs (``high``, then ``low``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowtune.experts import META_EXPERT, SECOND_TRANSFORMER, expert_file_name
from flowtune.train.model import LORA_WEIGHTS_NAME, load_lora, save_lora
from flowtune.train.weights import LoraWeights

LOW_NOISE_LORA_NAME = expert_file_name(LORA_WEIGHTS_NAME, "low")
"""A ``both`` checkpoint's second LoRA file: the low-noise expert's."""


class TwoExperts(nn.Module):
    """The high-noise (``high``, the pipeline's ``transformer``) and low-noise (``low``,
    ``transformer_2``) experts as one module.

    Args:
        high, low: The two transformers (same call signature).
        boundary: The pipeline's ``boundary_ratio`` b: ``high`` denoises timesteps >= b * 1000.
    """

    def __init__(self, high: nn.Module, low: nn.Module, boundary: float, num_train_timesteps: int = 1000):
        super().__init__()
        self.high = high
        self.low = low
        self.boundary_timestep = boundary * num_train_timesteps
        self.active: str | None = None  # set by the trainer for a step; None: route by timestep

    def expert(self, timestep: torch.Tensor) -> nn.Module:
        """The expert for a call: the active one, else the one whose range holds ``timestep``
        ([B], all on one side of the boundary: a host sync, outside training steps only)."""
        if self.active is not None:
            return self.high if self.active == "high" else self.low
        high = timestep >= self.boundary_timestep
        if bool(high.all()):
            return self.high
        if not bool(high.any()):
            return self.low
        raise ValueError("a call's timesteps straddle the experts' boundary; split the batch")

    def forward(self, *args: Any, timestep: torch.Tensor, **kwargs: Any) -> Any:
        """The chosen expert's forward (the transformer's arguments, ``timestep`` [B] by name)."""
        return self.expert(timestep)(*args, timestep=timestep, **kwargs)

    def enable_gradient_checkpointing(self) -> None:
        """Both experts' gradient checkpointing (diffusers' method)."""
        self.high.enable_gradient_checkpointing()
        self.low.enable_gradient_checkpointing()

    def pipeline_components(self) -> dict[str, nn.Module]:
        """``{"transformer": high, "transformer_2": low}``: the pipeline's components."""
        return {"transformer": self.high, SECOND_TRANSFORMER: self.low}


class ExpertLoras(LoraWeights):
    """``train.mode: lora`` with ``model.expert: both``: a LoRA on each of :class:`TwoExperts`."""

    @property
    def files(self) -> tuple[str, ...]:
        return (LORA_WEIGHTS_NAME, LOW_NOISE_LORA_NAME)

    def prepare(self, transformer: nn.Module) -> list[nn.Parameter]:
        return super().prepare(transformer.high) + super().prepare(transformer.low)

    def load(self, transformer: nn.Module, directory: Path) -> None:
        load_lora(transformer.high, directory)
        load_lora(transformer.low, directory, LOW_NOISE_LORA_NAME)

    def save(
        self,
        model: nn.Module,
        directory: Path,
        state: dict[str, torch.Tensor] | None,
        metadata: dict[str, str],
    ) -> None:
        from flowtune.flow_matching.adapters.base import unwrap_model

        experts = unwrap_model(model)
        for name, expert, file in (
            ("high", experts.high, LORA_WEIGHTS_NAME),
            ("low", experts.low, LOW_NOISE_LORA_NAME),
        ):
            save_lora(expert, self.spec, directory, metadata={**metadata, META_EXPERT: name}, name=file)

    def describe(self) -> str:
        lora = self.recipe.lora
        return f"LoRA rank {lora.rank}, alpha {lora.alpha}, one per expert (high and low noise)"
