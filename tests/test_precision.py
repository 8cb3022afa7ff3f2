"""Settings whose effect a loss value cannot show: that gradient checkpointing is on and really
recomputes the blocks in the backward pass, and that bf16 autocast reaches the model's Linear
layers (a run with either silently off would train the same and pass a loss-based test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from flowtune.recipe import load_recipe
from flowtune.train.trainer import Trainer
from tests.helpers import tiny_flux_training_env


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_flux_training_env(tmp_path_factory.mktemp("precision")).parent


def _one_step(env: Path, out: Path, *overrides: str, hook) -> Trainer:
    """Set a trainer up, register ``hook(model)``, run one training step, clean up."""
    trainer = Trainer(
        load_recipe(env / "recipe.yaml", [f"train.output_dir={out}", "train.max_steps=1", *overrides]),
        console=Console(quiet=True),
    )
    trainer.setup()
    try:
        hook(trainer.accelerator.unwrap_model(trainer.model))
        trainer.train_step(trainer.batches())
    finally:
        trainer.cleanup()
    return trainer


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_is_on_and_recomputes_each_block(
    env: Path, tmp_path: Path, checkpointing
) -> None:
    calls = []

    def hook(model) -> None:
        assert model.is_gradient_checkpointing is checkpointing
        for block in model.transformer_blocks:
            # A pre-hook: torch's checkpoint may stop a recomputation before the block returns.
            block.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))

    _one_step(env, tmp_path, f"train.gradient_checkpointing={checkpointing}", hook=hook)
    blocks = 2  # the tiny FLUX.1's double-stream blocks
    # Checkpointed: each block runs once in the forward pass and once more, recomputed, in the
    # backward pass.
    assert len(calls) == (2 * blocks if checkpointing else blocks)


@pytest.mark.parametrize(("precision", "dtype"), [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_bf16_autocast_reaches_the_linear_layers(env: Path, tmp_path: Path, precision, dtype) -> None:
    """The tiny model's weights are float32: only autocast makes its Linears compute in bf16."""
    seen = set()

    def hook(model) -> None:
        layer = model.transformer_blocks[0].attn.to_q.base_layer
        assert layer.weight.dtype == torch.float32
        layer.register_forward_hook(lambda _m, _i, output: seen.add(output.dtype))

    _one_step(env, tmp_path, f"train.mixed_precision={precision}", hook=hook)
    assert seen == {dtype}
