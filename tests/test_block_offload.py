"""train.block_offload on the CPU: the hooks run with offloaded weights left empty (``strict``),
so any use of a weight while its block is offloaded fails; losses and the trained LoRA equal those
of a run without offload, with and without gradient checkpointing; the refusals are one line.

train.activation_offload on the CPU, where the "CPU copy" of a saved tensor is a copy on the same
device: every saved tensor of the tiny model moves (the size floor set to 0), the backward reads
the copies, and losses and LoRA equal those without, alone, with block offload and on an int8
base."""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.recipe import load_recipe
from flowtune.train import activation_offload, offload
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


_PLAIN: dict[tuple, tuple] = {}


def _steps(
    model_dir: Path,
    *,
    resident: int | None,
    checkpointing: bool,
    steps: int = 3,
    quantize: str | None = None,
    activations: activation_offload.ActivationOffload | None = None,
):
    """``steps`` AdamW steps of a gaussian-initialised LoRA on the tiny FLUX.1 (2 + 2 blocks) with
    ``resident`` blocks kept (None = no offload) on a ``quantize``d base, each forward under
    ``activations``' hooks when given; the losses, the LoRA and the largest number of offloaded
    blocks that were on the device at once.  Runs without either offload are computed once."""
    key = (model_dir, checkpointing, steps, quantize)
    if resident is None and activations is None and key in _PLAIN:
        return _PLAIN[key]
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
            with activations.hooks() if activations is not None else contextlib.nullcontext():
                loss = model(**tiny_flux_inputs(step))[0].pow(2).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if hooks is not None:  # between steps every offloaded block is off, its weights empty
            assert not any(hooks.onloaded)
            assert all(w.current.numel() == 0 for weights in hooks.weights for w in weights)
    result = losses, [p.detach().clone() for p in params], most[0]
    if resident is None and activations is None:
        _PLAIN[key] = result
    return result


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
    """And so does one with gradient checkpointing and activation offload (the size floor set to 0,
    so the tiny model's saved tensors move)."""

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

    pack = activation_offload.ActivationOffload._pack
    with (
        mock.patch.object(activation_offload, "MIN_BYTES", 0),
        mock.patch.object(
            activation_offload.ActivationOffload, "_pack", autospec=True, side_effect=pack
        ) as packs,
    ):
        moved = run(tmp_path / "moved", "train.gradient_checkpointing=true", "train.activation_offload=true")
    assert packs.call_count > 0 and moved == plain
    c = load_file(tmp_path / "moved" / "final" / LORA_WEIGHTS_NAME)
    assert all(torch.equal(a[k], c[k]) for k in a)


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


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_activation_offload_gives_the_same_losses_and_lora(env) -> None:
    """Every saved tensor above the floor (0 here) is copied out in the forward and read back in
    the backward: alone, and with block offload (strict) on an int8 base, the losses and the LoRA
    equal those without, and no copy outlives its step.  The equality can fail: copies that come
    back as zeros change the LoRA, so the next loss."""
    losses, lora, _ = _steps(env, resident=None, checkpointing=True)
    hooks = activation_offload.ActivationOffload("cpu", min_bytes=0)
    moved, moved_lora, _ = _steps(env, resident=None, checkpointing=True, activations=hooks)
    assert moved == losses and _same(moved_lora, lora)
    assert hooks.packed > 0 and hooks.unpacked >= hooks.packed and hooks.host_bytes == 0

    unpack = activation_offload.ActivationOffload._unpack
    with mock.patch.object(
        activation_offload.ActivationOffload, "_unpack", lambda self, p: torch.zeros_like(unpack(self, p))
    ):
        zeroed, _, _ = _steps(env, resident=None, checkpointing=True, steps=2, activations=hooks)
    assert zeroed[0] == losses[0] and zeroed[1] != losses[1]  # the first backward read zeros

    losses, lora, _ = _steps(env, resident=None, checkpointing=True, quantize="int8")
    hooks = activation_offload.ActivationOffload("cpu", min_bytes=0)
    both = _steps(env, resident=1, checkpointing=True, quantize="int8", activations=hooks)
    assert both[0] == losses and _same(both[1], lora) and hooks.packed > 0 and hooks.host_bytes == 0


def test_what_activation_offload_moves() -> None:
    """Large plain tensors on the compute device; not parameters, their views, small tensors or
    tensors on another device."""
    weight = torch.nn.Parameter(torch.zeros(1024, 1024), requires_grad=False)
    hooks = activation_offload.ActivationOffload("cpu")
    assert hooks.moves(torch.zeros(1024, 1024)) and not hooks.moves(torch.zeros(16, 16))
    assert not hooks.moves(weight) and not hooks.moves(weight.t())
    assert not activation_offload.ActivationOffload("meta").moves(torch.zeros(1024, 1024))


def test_installed_hooks_hold_only_during_the_model_s_forward() -> None:
    """install: the hooks are entered for the model's forward and left after it, also when the
    forward raises, so nothing computed outside the model goes through them."""

    class Square(torch.nn.Module):
        def forward(self, x: torch.Tensor, fail: bool = False) -> torch.Tensor:
            if fail:
                raise ValueError("forward failed")
            return x * x

    model, x = Square(), torch.ones(4, requires_grad=True)
    hooks = activation_offload.ActivationOffload("cpu", min_bytes=0).install(model)
    (model(x) * x).sum().backward()
    # x * x saves x twice: one copy, read back twice; the product outside the model saves as usual.
    assert hooks.packed == 1 and hooks.unpacked == 2
    with pytest.raises(ValueError, match="forward failed"):
        model(x, fail=True)
    (x * x).sum().backward()
    assert hooks.packed == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "needs train.gradient_checkpointing=true"),
        (["train.gradient_checkpointing=true", "train.distributed=fsdp"], "set train.distributed=ddp"),
    ],
)
def test_recipe_refuses_what_activation_offload_cannot_do(env, overrides, message) -> None:
    with pytest.raises(FlowtuneError, match=message) as info:
        load_recipe(env / "recipe.yaml", ["train.activation_offload=true", *overrides])
    assert "train.activation_offload" in str(info.value) and "\n" not in str(info.value)
