"""``model.quantize``: a LoRA trained on a torchao-quantized frozen base (int8, fp8, nf4).

The promises under test: the quantized transformer's output stays within a stated relative error
of the unquantized one; the family's unquantized layers stay as they are; LoRA trains on top
(with gradient checkpointing, and under DDP) and its losses follow the unquantized run's; the LoRA
file is an ordinary one that plain diffusers loads on the unquantized base and that
``flowtune export --merge`` fuses into it; and the recipe refuses what cannot work, in one line.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from flowtune.families import family_names, get_family
from flowtune.families.flux.tiny import tiny_flux_transformer
from flowtune.memory.quantize import matches_any, quantize_linears
from flowtune.recipe import RecipeError, load_recipe
from flowtune.tiny import make_tiny
from flowtune.train.metrics import read_metrics
from flowtune.train.model import LORA_WEIGHTS_NAME, add_lora, load_transformer
from flowtune.train.trainer import Trainer
from tests.helpers import tiny_flux_inputs, tiny_flux_training_env

STEPS = 12

# Relative error (L2 norm of the difference / L2 norm) of the tiny FLUX.1 transformer's output
# (hidden 64, random weights, float32) with the family's layers quantized, against the same
# unquantized model.  Measured: int8 0.05%, fp8 0.3%, nf4 1.2% (docs/training.md).
MAX_RELATIVE_ERROR = {"int8": 0.002, "fp8": 0.01, "nf4": 0.03}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)
    return tiny_flux_transformer(hidden=64).requires_grad_(False)


@pytest.mark.parametrize("mode", ["int8", "fp8", "nf4"])
def test_quantized_output_stays_within_the_stated_error(base: nn.Module, mode: str) -> None:
    inputs = tiny_flux_inputs()
    quantized = copy.deepcopy(base)
    summary = quantize_linears(quantized, mode, get_family("flux").quantize_skip)
    with torch.no_grad():
        want, got = base(**inputs)[0], quantized(**inputs)[0]
    error = _relative_error(got, want)
    assert 0 < error < MAX_RELATIVE_ERROR[mode], error
    # Every block linear is quantized; the family keeps its embedders and output layers.
    assert len(summary.quantized) == 40 and not summary.unsupported
    assert sorted(summary.kept)[:3] == ["context_embedder", "norm_out.linear", "proj_out"]
    assert type(quantized.proj_out.weight) is nn.Parameter
    assert type(quantized.x_embedder.weight) is nn.Parameter
    for layer in (
        quantized.single_transformer_blocks[0].proj_out,  # not the final proj_out
        quantized.transformer_blocks[1].norm1.linear,
        quantized.transformer_blocks[0].attn.to_q,
    ):
        assert type(layer.weight) is not nn.Parameter and not layer.weight.requires_grad


def test_lora_trains_on_a_quantized_base_with_gradient_checkpointing(base: nn.Module) -> None:
    for mode in ("int8", "fp8", "nf4"):
        model = copy.deepcopy(base)
        quantize_linears(model, mode, get_family("flux").quantize_skip)
        params = add_lora(model, get_family("flux"), rank=4, alpha=4)
        assert {p.dtype for p in params} == {torch.float32}
        model.enable_gradient_checkpointing()
        model.train()
        model.transformer_blocks[0].attn.to_q.lora_B["default"].weight.data.normal_()
        model(**tiny_flux_inputs())[0].pow(2).mean().backward()
        assert all(p.grad is not None for p in params), mode
        assert model.transformer_blocks[0].attn.to_q.lora_A["default"].weight.grad.abs().sum() > 0


def test_skip_patterns_are_full_names_or_globs_covering_children() -> None:
    assert matches_any("proj_out", ("proj_out",))
    assert not matches_any("single_transformer_blocks.0.proj_out", ("proj_out",))
    assert matches_any("time_text_embed.timestep_embedder.linear_1", ("time_text_embed",))
    assert matches_any("transformer_blocks.3.norm1.linear", ("transformer_blocks.*.norm1",))
    assert not matches_any("transformer_blocks.3.attn.to_q", ("transformer_blocks.*.norm1",))


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["model.quantize=int8", "train.mode=full"], "needs train.mode=lora"),
        (["model.quantize=nf4", "train.distributed=fsdp"], "set train.distributed=ddp"),
        (["model.quantize=int4"], "expected one of int8, fp8, nf4 or null"),
    ],
)
def test_recipe_refuses_what_a_quantized_base_cannot_do(
    tmp_path: Path, overrides: list[str], says: str
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {pretrained: some/model}\ndata: {source: data}\n")
    with pytest.raises(RecipeError, match="'model.quantize'") as error:
        load_recipe(recipe, overrides)
    assert says in str(error.value) and "\n" not in str(error.value)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny FLUX.1 trained for STEPS steps with gradient checkpointing, unquantized (``plain``)
    and on an int8 base (``int8``).  (Block offload of a quantized base, every use of a weight
    while its block is onloaded, is tests/test_block_offload.py's.)"""
    root = tmp_path_factory.mktemp("quantize")
    recipe = tiny_flux_training_env(
        root,
        train=f"max_steps: {STEPS}, seed: 0, mixed_precision: 'no', checkpoint_every: {STEPS},"
        " log_every: 1, gradient_checkpointing: true",
    )
    for name, quantize in (("plain", "null"), ("int8", "int8")):
        overrides = [f"model.quantize={quantize}", f"train.output_dir={root / name}"]
        Trainer(load_recipe(recipe, overrides), console=Console(quiet=True)).run()
    return root


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_an_int8_run_follows_the_unquantized_run_and_its_lora_trains(runs: Path) -> None:
    plain, int8 = _losses(runs / "plain"), _losses(runs / "int8")
    assert len(int8) == STEPS
    assert int8 == pytest.approx(plain, rel=0.01)  # measured: within 0.1% at every step
    lora = load_file(runs / "int8" / "final" / LORA_WEIGHTS_NAME)
    b = [v for k, v in lora.items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b)  # B starts at zero: every layer learned


def test_the_lora_loads_in_plain_diffusers_on_the_unquantized_base(runs: Path) -> None:
    from diffusers import FluxPipeline

    file = runs / "int8" / "final" / LORA_WEIGHTS_NAME
    lora = load_file(file)
    pipe = FluxPipeline.from_pretrained(runs / "tiny-flux", dtype=torch.float32)
    pipe.load_lora_weights(file.parent)
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(lora)
    for key, value in lora.items():
        name = key.removeprefix("transformer.").replace(".weight", ".default_0.weight")
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
    assert all(type(p) is nn.Parameter for p in pipe.transformer.parameters())


def test_export_merge_fuses_it_into_the_unquantized_base(runs: Path, tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    from flowtune.interop.export import export

    # What `flowtune export CKPT --merge` runs: it loads the recipe's base as it is stored.
    merged_dir = export(runs / "int8" / "final", out=tmp_path / "merged", merge=True).path
    merged = FluxTransformer2DModel.from_pretrained(merged_dir)
    base = FluxTransformer2DModel.from_pretrained(runs / "tiny-flux", subfolder="transformer")
    state, base_state = merged.state_dict(), base.state_dict()
    assert state.keys() == base_state.keys() and not any("lora" in k for k in state)
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in state.values())
    # The LoRA's layers changed; the embedders (never LoRA targets) are the base's, bit for bit.
    assert not torch.equal(
        state["transformer_blocks.0.attn.to_q.weight"], base_state["transformer_blocks.0.attn.to_q.weight"]
    )
    assert torch.equal(state["x_embedder.weight"], base_state["x_embedder.weight"])


def test_ddp_wraps_a_quantized_base_once_its_weights_are_excluded() -> None:
    """DDP broadcasts every parameter when it starts, and torchao's tensors implement none of the
    ops that needs; they need no copy (every process quantizes the same file the same way) and,
    frozen, never reach DDP's all-reduce.  Checked end to end by hand: 2 CPU processes with
    int8, fp8 and nf4 bases train the single process's run (same losses).  Here one gloo process
    group of world size 1, in this process (destroyed after), wraps the int8 tiny transformer with
    its LoRA as Accelerate does, without and with ``exclude_quantized_from_ddp``."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from flowtune.families.flux.tiny import tiny_flux_transformer
    from flowtune.memory.quantize import exclude_quantized_from_ddp, quantize_linears
    from flowtune.train.model import add_lora

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = get_family("flux")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        outcomes = []
        for exclude in (False, True):
            model = tiny_flux_transformer().requires_grad_(False)
            quantize_linears(model, "int8", spec.quantize_skip)
            add_lora(model, spec, rank=4, alpha=4)
            names = exclude_quantized_from_ddp(model) if exclude else []
            try:
                DistributedDataParallel(model)
                outcomes.append(f"wrapped {len(names)}")
            except NotImplementedError:
                outcomes.append("refused")
    finally:
        dist.destroy_process_group()
    # 40 quantized block linears; the LoRA targets among them are now peft's base_layer weights.
    assert outcomes == ["refused", "wrapped 40"]


@pytest.mark.parametrize("family", family_names())
def test_each_family_loads_quantized_keeping_what_its_skip_list_names(family: str, tmp_path: Path) -> None:
    """Through ``load_transformer``, as training loads it: every ``quantize_skip`` pattern names a
    layer of the family's transformer (a renamed module would silently get quantized)."""
    spec = get_family(family)
    model = make_tiny(family, tmp_path / family)
    transformer = load_transformer(spec, model, torch.float32, quantize="int8")
    summary = transformer.flowtune_quantized
    assert summary.quantized and not summary.unsupported
    for pattern in spec.quantize_skip:
        assert any(matches_any(name, (pattern,)) for name in summary.kept), pattern
    assert not any(p.requires_grad for p in transformer.parameters())


def test_cuda_runs_turn_cudnn_attention_off() -> None:
    """On CUDA, training and sampling turn PyTorch's cuDNN attention backend off (its backward
    failed at FLUX.1-dev's shapes on an H200, docs/performance.md); on a CPU nothing changes."""
    from unittest import mock

    from flowtune.distributed import avoid_cudnn_attention

    with mock.patch("torch.backends.cuda.enable_cudnn_sdp") as enable:
        with mock.patch("torch.cuda.is_available", return_value=False):
            avoid_cudnn_attention()
        enable.assert_not_called()
        with mock.patch("torch.cuda.is_available", return_value=True):
            avoid_cudnn_attention()
        enable.assert_called_once_with(False)
