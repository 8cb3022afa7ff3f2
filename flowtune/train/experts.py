"""Training both experts of a two-expert pipeline in one run (``model.expert: both``,
:mod:`flowtune.experts`).

- :class:`TwoExperts` holds the two transformers as one module, so that the trainer's one model,
  optimizer (over both LoRAs) and learning-rate schedule (following the run's step) serve both;
  a call goes to the expert the trainer made active for the step, or (validation loss, sampling
  nothing) to the one whose sigma range holds the call's timesteps.
- :class:`ExpertFlows` is the trainer's flow-matching pipelines for ``model.expert``: one per
  trained expert (sigma sampled within its range) and the whole range's (validation), and which
  of them a step uses.
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

from flowtune.experts import (
    META_EXPERT,
    SECOND_TRANSFORMER,
    Expert,
    boundary_ratio,
    expert_file_name,
    expert_for_step,
    experts,
)
from flowtune.flow_matching import FlowMatchingPipeline, create_pipeline
from flowtune.flow_matching.adapters.base import unwrap_model
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


def recipe_experts(recipe: Any, family: Any) -> list[Expert]:
    """The experts ``model.expert`` trains (:mod:`flowtune.experts`), high first, their boundary
    from the model's model_index.json; none without ``model.expert``.

    Raises:
        FlowtuneError: the model has no second expert (``transformer_2``, ``boundary_ratio``).
    """
    from flowtune.model_files import resolve_pretrained

    m = recipe.model
    if m.expert is None:
        return []
    return experts(m.expert, boundary_ratio(resolve_pretrained(m.pretrained, m.revision, [], family=family)))


def expert_model(loaded: list[nn.Module], trained: list[Expert]) -> nn.Module:
    """The module a run trains from its loaded transformers (one per trained expert, high first,
    or the one transformer): :class:`TwoExperts` for ``model.expert=both``."""
    return loaded[0] if len(loaded) == 1 else TwoExperts(*loaded, trained[0].sigma_range[0])


class ExpertFlows:
    """The trainer's flow-matching pipelines: one per trained expert, sigma sampled within its
    range (``flow.sigma_range``), and the recipe's own over the whole range.

    :attr:`default` is the pipeline of a run's steps outside :meth:`for_step` and of validation:
    a one-expert run's expert's, else the whole range's.  With two experts each step takes its
    expert's (:meth:`for_step`), the same on every process and on resume.

    Args:
        adapter: The family's adapter name; ``adapter_args``, ``flow``: the recipe's
            ``model.adapter`` and ``flow`` as plain dicts.
        trained: The run's experts (:func:`recipe_experts`); empty without ``model.expert``.
        seed: ``train.seed``, which with the step chooses a two-expert step's expert.
    """

    def __init__(
        self, adapter: str, adapter_args: dict, flow: dict, trained: list[Expert], seed: int
    ) -> None:
        self.by_expert = {
            e.name: create_pipeline(adapter, adapter_args, **{**flow, "sigma_range": e.sigma_range})
            for e in trained
        }
        whole = create_pipeline(adapter, adapter_args, **flow) if len(trained) != 1 else None
        self.default: FlowMatchingPipeline = whole or next(iter(self.by_expert.values()))
        self.seed = seed
        # both: the high expert's share of the steps, the sampling distribution's mass in its range.
        self.high_share = self.default.sigma_mass(*trained[0].sigma_range) if len(trained) > 1 else 1.0

    def for_step(self, step: int, model: nn.Module) -> FlowMatchingPipeline:
        """The pipeline of optimizer step ``step`` (0-based); with two experts, the expert
        :func:`flowtune.experts.expert_for_step` chooses is made the one ``model`` runs."""
        if len(self.by_expert) < 2:
            return self.default
        name = expert_for_step(self.seed, step, self.high_share)
        unwrap_model(model).active = name
        return self.by_expert[name]

    def after_step(self, model: nn.Module) -> FlowMatchingPipeline:
        """:attr:`default`, once a step is done; other calls of a two-expert ``model``
        (validation) go to the expert whose range holds their timesteps."""
        if len(self.by_expert) > 1:
            unwrap_model(model).active = None
        return self.default


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
