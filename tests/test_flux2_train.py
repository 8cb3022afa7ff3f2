"""FLUX.2 on a tiny model beyond the family contract (tests/test_family_contract.py, which checks
text-to-image validation and sampling against Flux2Pipeline): the checkpoint LoRA's modules and
alpha as Flux2Pipeline reads them, editing with reference images of another size than the target
in validation and `flowtune sample`, and FLUX.1 LoRAs refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from flowtune.data.preprocess import preprocess
from flowtune.data.synthetic import make_edit_pairs_dataset, make_shapes_dataset
from flowtune.families.flux.tiny import tiny_flux_transformer
from flowtune.recipe import load_recipe
from flowtune.sample import SampleSettings, sample, source_from_checkpoint
from flowtune.tiny import make_tiny
from flowtune.train.metrics import read_metrics
from flowtune.train.model import META_FAMILY, META_TRAINED_LORA, read_lora_metadata
from flowtune.train.trainer import Trainer
from tests.helpers import assert_user_error, cli

PROMPT = "a red circle on a white background"
INSTRUCTION = "make the circle blue"
TEXT_TOKENS = 48  # the tiny Mistral's system message takes ~30 tokens before the caption


def _recipe(root: Path, name: str, data: str, validation: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(
        f"model: {{family: flux2, pretrained: '{root / 'tiny-flux2'}', dtype: float32}}\n"
        "lora: {rank: 4, alpha: 8, init: gaussian}\n"
        f"data: {{cache_dir: '{root / name / 'cache'}', resolution: 64, max_sequence_length: {TEXT_TOKENS},"
        f" validation_split: 0.25, {data}}}\n"
        f"train: {{output_dir: '{root / name / 'run'}', max_steps: 2, seed: 0, mixed_precision: 'no',"
        " checkpoint_every: 2, batch_size: 2}\n"
        "optimizer: {lr: 5.0e-2}\n"
        f"validation: {{every: 2, seed: 3, steps: 2, guidance: 2.5, height: 64, width: 48, {validation}}}\n"
    )
    return path


def _train(recipe_path: Path) -> Path:
    recipe = load_recipe(recipe_path)
    preprocess(recipe, console=Console(quiet=True))
    Trainer(recipe, console=Console(quiet=True)).run()
    return Path(recipe.train.output_dir)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flux2-train")
    make_tiny("flux2", root / "tiny-flux2")
    return root


@pytest.fixture(scope="module")
def t2i_run(root: Path) -> Path:
    """A 2-step FLUX.2 LoRA run on 8 captioned shapes."""
    make_shapes_dataset(root / "shapes", 8, seed=1)
    return _train(_recipe(root, "t2i", f"source: '{root / 'shapes'}'", f"prompts: ['{PROMPT}']"))


@pytest.fixture(scope="module")
def edit_run(root: Path) -> Path:
    """A 2-step FLUX.2 LoRA run on 8 edit pairs whose sources (80x64) differ from targets (64x64)."""
    make_edit_pairs_dataset(root / "edits", 8, seed=1, sizes=[(64, 64)], control_sizes=[(80, 64)])
    control = root / "edits" / "control" / "0000.png"
    return _train(
        _recipe(
            root, "edit", f"source: '{root / 'edits'}', edit_pairs: true",
            f"prompts: ['{INSTRUCTION}'], images: ['{control}']",
        )
    )  # fmt: skip


def _diffusers(root: Path, lora_dir: Path | None, seed: int, **call) -> np.ndarray:
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(root / "tiny-flux2", dtype=torch.float32)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe(**call, generator=torch.Generator().manual_seed(seed)).images[0])


def test_the_checkpoint_lora_loads_in_diffusers_flux2_pipeline(t2i_run) -> None:
    from diffusers import Flux2Pipeline

    lora_dir = t2i_run / "checkpoints" / "step-000002"
    state, config = Flux2Pipeline.lora_state_dict(lora_dir, return_lora_metadata=True)
    modules = {key.rsplit(".lora_", 1)[0] for key in state}
    assert "transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj" in modules
    assert "transformer.transformer_blocks.0.ff_context.linear_out" in modules
    assert len(modules) == 2 * 12 + 2 * 2  # 12 targets per double block, 2 per single block
    # The scale alpha / rank = 2 is in the file's B: its config says alpha = rank, the trained
    # alpha is in flowtune's metadata.
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 4
    metadata = read_lora_metadata(lora_dir / "pytorch_lora_weights.safetensors")
    assert metadata[META_FAMILY] == "flux2"
    assert json.loads(metadata[META_TRAINED_LORA])["lora_alpha"] == 8
    losses = [r["loss"] for r in read_metrics(t2i_run / "metrics.jsonl") if "loss" in r]
    assert losses and all(np.isfinite(losses))


def test_a_flux1_lora_is_refused_for_flux2(root, tmp_path) -> None:
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = tiny_flux_transformer()
    transformer.add_adapter(LoraConfig(r=2, target_modules=["ff.net.2"]))
    FluxPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        weight_name="flux1.safetensors",
    )
    lora = tmp_path / "flux1.safetensors"
    result = cli("sample", "--model", str(root / "tiny-flux2"), "--lora", str(lora), "-p", "x")
    assert_user_error(result, str(lora))


def test_edit_validation_and_sampling_equal_diffusers_with_the_checkpoint_lora(
    edit_run, root, tmp_path
) -> None:
    control = root / "edits" / "control" / "0000.png"
    got = Image.open(edit_run / "samples" / "step-000002" / "000000.png")
    assert got.text["image"] == str(control)
    expected = _diffusers(
        root, edit_run / "checkpoints" / "step-000002", 3, prompt=INSTRUCTION, image=[Image.open(control)],
        height=64, width=48, num_inference_steps=2, guidance_scale=2.5, max_sequence_length=TEXT_TOKENS,
    )  # fmt: skip
    assert np.array_equal(np.asarray(got), expected)

    other = root / "edits" / "control" / "0003.png"
    result = sample(
        source_from_checkpoint(edit_run), ["make it green"],
        SampleSettings(seed=9, steps=2, height=32, width=64, guidance=2.5, max_sequence_length=TEXT_TOKENS),
        tmp_path, images=[other],
    )  # fmt: skip
    expected = _diffusers(
        root, edit_run / "final", 9, prompt="make it green", image=[Image.open(other)], height=32, width=64,
        num_inference_steps=2, guidance_scale=2.5, max_sequence_length=TEXT_TOKENS,
    )  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(result.images[0])), expected)


def test_an_edit_lora_also_samples_text_to_image(edit_run, tmp_path) -> None:
    result = sample(
        source_from_checkpoint(edit_run), ["a green star"], SampleSettings(seed=1, steps=2, height=32, width=32),
        tmp_path,
    )  # fmt: skip
    assert len(result.images) == 1 and Image.open(result.images[0]).size == (32, 32)
