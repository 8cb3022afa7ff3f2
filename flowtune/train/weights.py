"""What a run trains (``train.mode``), as one strategy object: how the trainable weights are made,
saved into a checkpoint, loaded back to resume, gathered under FSDP2, named and described.

- :class:`LoraWeights` (``lora``): peft LoRA layers on the frozen transformer; a checkpoint holds
  ``pytorch_lora_weights.safetensors`` (:func:`flowtune.train.model.save_lora`).
- :class:`FullWeights` (``full``): every transformer weight, in float32; a checkpoint holds
  ``transformer/`` in diffusers format (:func:`flowtune.train.model.save_full`).

The trainer and its parts call these methods instead of branching on the mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowtune.experts import META_EXPERT
from flowtune.families import FamilySpec
from flowtune.train.model import (
    LORA_WEIGHTS_NAME,
    add_lora,
    load_full,
    load_lora,
    lora_state_dict,
    make_fully_trainable,
    save_full,
    save_lora,
)


class TrainedWeights:
    """The trained weights of a run (subclass per ``train.mode``).

    Attributes:
        name: Their file or folder in a checkpoint (and in ``final/``).
        files: Every file or folder of them (``name`` and, for two-expert runs, the second
            expert's LoRA: :class:`flowtune.train.experts.ExpertLoras`).
    """

    name: str = ""

    @property
    def files(self) -> tuple[str, ...]:
        return (self.name,)

    def __init__(self, recipe: Any, spec: FamilySpec) -> None:
        self.recipe = recipe
        self.spec = spec

    def prepare(self, transformer: nn.Module) -> list[nn.Parameter]:
        """Make the trainable weights on the loaded, frozen ``transformer``; returns them."""
        raise NotImplementedError

    def load(self, transformer: nn.Module, directory: Path) -> None:
        """Load a checkpoint's weights into the prepared ``transformer`` bit for bit (resume).

        Raises:
            FlowtuneError: the checkpoint's weights do not fit this run.
        """
        raise NotImplementedError

    def gather(self, model: nn.Module, accelerator: Any) -> dict[str, torch.Tensor]:
        """Full tensors of the weights FSDP2 shards (a collective: every process calls it)."""
        raise NotImplementedError

    def save(
        self,
        model: nn.Module,
        directory: Path,
        state: dict[str, torch.Tensor] | None,
        metadata: dict[str, str],
    ) -> None:
        """Write the weights into ``directory`` (from ``state`` when gathered, else the model)."""
        raise NotImplementedError

    def describe(self) -> str:
        """What is trained, for the banner."""
        raise NotImplementedError


class LoraWeights(TrainedWeights):
    """``train.mode: lora``."""

    name = LORA_WEIGHTS_NAME

    def prepare(self, transformer: nn.Module) -> list[nn.Parameter]:
        lora = self.recipe.lora
        return add_lora(
            transformer,
            self.spec,
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=list(lora.target_modules) if lora.target_modules else None,
            init=lora.init,
        )

    def load(self, transformer: nn.Module, directory: Path) -> None:
        load_lora(transformer, directory)

    def gather(self, model: nn.Module, accelerator: Any) -> dict[str, torch.Tensor]:
        return lora_state_dict(model)

    def save(
        self,
        model: nn.Module,
        directory: Path,
        state: dict[str, torch.Tensor] | None,
        metadata: dict[str, str],
    ) -> None:
        expert = self.recipe.model.expert  # high / low: which transformer it loads into
        if expert is not None:
            metadata = {**metadata, META_EXPERT: expert}
        save_lora(model, self.spec, directory, state=state, metadata=metadata)

    def describe(self) -> str:
        expert = self.recipe.model.expert
        on = f", on the {expert}-noise expert" if expert in ("high", "low") else ""
        return f"LoRA rank {self.recipe.lora.rank}, alpha {self.recipe.lora.alpha}{on}"


class FullWeights(TrainedWeights):
    """``train.mode: full``."""

    name = "transformer"

    def prepare(self, transformer: nn.Module) -> list[nn.Parameter]:
        return make_fully_trainable(transformer)

    def load(self, transformer: nn.Module, directory: Path) -> None:
        load_full(transformer, directory)

    def gather(self, model: nn.Module, accelerator: Any) -> dict[str, torch.Tensor]:
        return accelerator.get_state_dict(model)

    def save(
        self,
        model: nn.Module,
        directory: Path,
        state: dict[str, torch.Tensor] | None,
        metadata: dict[str, str],
    ) -> None:
        save_full(model, directory, state=state)

    def describe(self) -> str:
        return "full fine-tuning"


def trained_weights(recipe: Any, spec: FamilySpec) -> TrainedWeights:
    """The strategy for ``recipe.train.mode`` (and ``model.expert: both``)."""
    if recipe.model.expert == "both":
        from flowtune.train.experts import ExpertLoras

        return ExpertLoras(recipe, spec)
    return (LoraWeights if recipe.train.mode == "lora" else FullWeights)(recipe, spec)
