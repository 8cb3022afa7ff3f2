"""train.block_offload on the CPU: the hooks run with offloaded weights left empty (``strict``),
so any use of a weight while its block is offloaded fails; losses and the trained LoRA equal those
of a run without offload, with and without gradient checkpointing; the refusals are one line."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.recipe import load_recipe
from flowtune.train import offload
from flowtune.train.metrics import read_metrics
from flowtune.train.model import LORA_WEIGHTS_NAME, add_lora, load_transformer
from flowtune.train.trainer import Trainer
from tests.helpers import cli, tiny_flux_inputs, tiny_flux_training_env

FLUX = get_family("flux")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("offload")
    tiny_flux_training_env(root)
    return root


def _steps(
    model_dir: Path, *, resident: int | None, checkpointing: bool, steps: int = 3, quantize: str | None = None
):
    """``steps`` AdamW steps of a gaussian-initialised LoRA on the tiny FLUX.1 (2 + 2 blocks) with
    ``resident`` blocks kept (None = no offload) on a ``quantize``d base; the losses, the LoRA and
    the largest number of offloaded blocks that were on the device at once."""
    torch.manual_seed(0)
    model = load_transformer(FLUX, model_dir / "tiny-flux", torch.float32, quantize=quantize)
    params = add_lora(model, FLUX, rank=4, alpha=4, init="gaussian")
    if checkpointing:
        model.enable_gradient_checkpointing()
    hooks = None
    if resident is not None:
        hooks = offload.offload_blocks(model, FLUX, resident, torch.device("cpu"), strict=True)
    most = [0]
    onload = offload.BlockOffload._onload

    def counted(self: offload.BlockOffload, index: int, *, wait: bool) -> None:
        onload(self, index, wait=wait)
        most[0] = max(most[0], sum(self.onloaded))

    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(steps):
        with mock.patch.object(offload.BlockOffload, "_onload", counted):
            loss = model(**tiny_flux_inputs(step))[0].pow(2).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if hooks is not None:  # between steps every offloaded block is off, its weights empty
            assert not any(hooks.onloaded)
            assert all(w.current.numel() == 0 for weights in hooks.weights for w in weights)
    return losses, [p.detach().clone() for p in params], most[0]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_blocks_give_the_same_losses_and_lora(env, checkpointing) -> None:
    losses, lora, _ = _steps(env, resident=None, checkpointing=checkpointing)
    for resident in (0, 3):
        offloaded, offloaded_lora, most = _steps(env, resident=resident, checkpointing=checkpointing)
        assert offloaded == losses
        assert all(torch.equal(a, b) for a, b in zip(lora, offloaded_lora, strict=True))
        assert most == min(2, 4 - resident)  # the block computing and the one prefetched


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_quantized_blocks_are_offloaded_quantized_with_the_same_losses(env, quantize) -> None:
    """model.quantize with block offload: the quantized weights (tensor subclasses) move as they
    are, and every use of one happens while its block is onloaded (strict), recomputation included."""
    losses, lora, _ = _steps(env, resident=None, checkpointing=True, quantize=quantize)
    offloaded, offloaded_lora, most = _steps(env, resident=1, checkpointing=True, quantize=quantize)
    assert offloaded == losses
    assert all(torch.equal(a, b) for a, b in zip(lora, offloaded_lora, strict=True))
    assert most == 2


def test_without_the_backward_hook_an_offloaded_weight_is_used(env) -> None:
    """The strict test above can fail: the backward needs the blocks' weights back."""
    with mock.patch.object(offload.BlockOffload, "_pre_backward", lambda self, index: None):
        with pytest.raises(RuntimeError):
            _steps(env, resident=0, checkpointing=False, steps=1)


def test_a_training_run_with_block_offload_equals_one_without(env, tmp_path) -> None:
    def run(out: Path, *overrides: str) -> list[float]:
        recipe = load_recipe(
            env / "recipe.yaml", [f"train.output_dir={out}", "train.max_steps=3", *overrides]
        )
        Trainer(recipe).run()
        return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]

    plain = run(tmp_path / "plain")
    strict = partial(offload.offload_blocks, strict=True)
    with mock.patch("flowtune.train.trainer.offload_blocks", side_effect=strict) as hooks:
        streamed = run(tmp_path / "offload", "train.block_offload=1")
    assert hooks.call_count == 1 and hooks.call_args.args[2] == 1
    assert streamed == plain
    a = load_file(tmp_path / "plain" / "final" / LORA_WEIGHTS_NAME)
    b = load_file(tmp_path / "offload" / "final" / LORA_WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.block_offload=-1"], "must be 0 or a positive number of blocks"),
        (["train.block_offload=2", "train.mode=full"], "needs train.mode=lora"),
        (["train.block_offload=2", "train.distributed=fsdp"], "set train.distributed=ddp"),
    ],
)
def test_recipe_refuses_what_block_offload_cannot_do(env, overrides, message) -> None:
    with pytest.raises(FlowtuneError, match=message) as info:
        load_recipe(env / "recipe.yaml", overrides)
    assert "train.block_offload" in str(info.value) and "\n" not in str(info.value)


def test_more_blocks_than_the_model_has_is_refused_before_its_weights_are_fetched(env, tmp_path) -> None:
    with mock.patch("flowtune.train.trainer.resolve_pretrained", side_effect=AssertionError("fetched")):
        result = cli(
            "train", env / "recipe.yaml", f"train.output_dir={tmp_path / 'run'}", "train.block_offload=5"
        )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.block_offload=5" in lines[0] and "(4)" in lines[0], result.stderr


def test_validation_s_pipeline_leaves_the_offloaded_weights_where_they_are(env) -> None:
    """``load_pipeline`` (validation images) moves the VAE to the device but not the offloaded
    transformer (``pipe.to`` would put every block's weights on the device)."""
    from flowtune.encoders.base import load_pipeline

    model = load_transformer(FLUX, env / "tiny-flux", torch.float32)
    add_lora(model, FLUX, rank=4, alpha=4)
    offload.offload_blocks(model, FLUX, 1, torch.device("cpu"), strict=True)
    encoders = FLUX.load_encoder_class().text_components
    with mock.patch.object(model, "to", side_effect=AssertionError("the transformer was moved")):
        pipe = load_pipeline(
            FLUX, env / "tiny-flux", dtype=torch.float32, device="cpu", transformer=model, without=encoders
        )
    assert pipe.transformer is model and pipe.vae is not None


def test_the_blocks_whose_quantized_layers_go_back_to_the_cpu(env) -> None:
    """With model.quantize and block offload, the layers of the streamed blocks (all but the last
    N in forward order) return to the CPU once quantized; without both, none do."""
    model = env / "tiny-flux"
    assert offload.quantized_host_blocks(FLUX, model, "int8", 1) == [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
    ]
    assert offload.quantized_host_blocks(FLUX, model, "int8", 4) == []
    assert offload.quantized_host_blocks(FLUX, model, None, 1) == []
    assert offload.quantized_host_blocks(FLUX, model, "nf4", None) == []
