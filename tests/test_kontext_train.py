"""FLUX.1 Kontext end to end on a tiny model: training on edit pairs, validation edits and
`flowtune sample --ckpt --image` identical to plain FluxKontextPipeline with the checkpoint's LoRA,
several references per pair, and the LoRA export."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from flowtune.data.preprocess import preprocess
from flowtune.data.synthetic import make_edit_pairs_dataset
from flowtune.interop import export
from flowtune.recipe import load_recipe
from flowtune.sample import SampleSettings, sample, source_from_checkpoint
from flowtune.tiny import make_tiny
from flowtune.train.metrics import read_metrics
from flowtune.train.trainer import Trainer

INSTRUCTION = "make the circle blue"


def _recipe(root: Path, data: Path, name: str, *extra: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(
        f"model: {{family: flux-kontext, pretrained: '{root / 'tiny-kontext'}', dtype: float32}}\n"
        "lora: {rank: 4, alpha: 8, init: gaussian}\n"
        f"data: {{source: '{data}', cache_dir: '{root / name / 'cache'}', resolution: 64,"
        " max_sequence_length: 16, control_resize: match_target, validation_split: 0.25}\n"
        f"train: {{output_dir: '{root / name / 'run'}', max_steps: 2, seed: 0, mixed_precision: 'no',"
        " checkpoint_every: 2, batch_size: 2}\n"
        "optimizer: {lr: 5.0e-2}\n"
        f"validation: {{prompts: ['{INSTRUCTION}'], images: ['{data / 'control' / '0000.png'}'], every: 2,"
        " seed: 3, steps: 2, guidance: 2.5, height: 64, width: 48}\n" + "".join(f"{line}\n" for line in extra)
    )
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step Kontext LoRA run on 8 edit pairs whose sources (48x64) differ from targets (64x64)."""
    root = tmp_path_factory.mktemp("kontext-train")
    make_tiny("flux-kontext", root / "tiny-kontext")
    make_edit_pairs_dataset(root / "edits", 8, seed=1, sizes=[(64, 64)], control_sizes=[(48, 64)])
    recipe = load_recipe(_recipe(root, root / "edits", "one"))
    preprocess(recipe, console=Console(quiet=True))
    Trainer(recipe, console=Console(quiet=True)).run()
    return root / "one" / "run"


def _diffusers_edit(model: Path, lora_dir: Path, source: Path, **call) -> np.ndarray:
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.load_lora_weights(lora_dir)
    pipe.set_progress_bar_config(disable=True)
    h, w = call["height"], call["width"]
    image = pipe.image_processor.resize(Image.open(source).convert("RGB"), h, w)  # match_target
    seed = call.pop("seed")
    result = pipe(
        image=image, _auto_resize=False, max_area=h * w, generator=torch.Generator().manual_seed(seed), **call
    )
    return np.asarray(result.images[0])


def test_validation_edits_equal_diffusers_with_the_checkpoint_lora(trained) -> None:
    root = trained.parent.parent
    got = Image.open(trained / "samples" / "step-000002" / "000000.png")
    assert got.text["image"] == str(root / "edits" / "control" / "0000.png")
    expected = _diffusers_edit(
        root / "tiny-kontext", trained / "checkpoints" / "step-000002", root / "edits" / "control" / "0000.png",
        prompt=INSTRUCTION, height=64, width=48, num_inference_steps=2, guidance_scale=2.5,
        max_sequence_length=16, seed=3,
    )  # fmt: skip
    assert np.array_equal(np.asarray(got), expected)
    assert [r["step"] for r in read_metrics(trained / "metrics.jsonl") if "val_loss" in r] == [2]


def test_sample_from_the_checkpoint_equals_diffusers_with_its_lora(trained, tmp_path) -> None:
    root = trained.parent.parent
    source = source_from_checkpoint(trained)
    assert source.control_resize == "match_target" and source.images == [
        str(root / "edits" / "control" / "0000.png")
    ]
    result = sample(
        source, ["make it green"], SampleSettings(seed=9, steps=2, height=32, width=64, guidance=2.5), tmp_path,
        images=[root / "edits" / "control" / "0003.png"],
    )  # fmt: skip
    expected = _diffusers_edit(
        root / "tiny-kontext", trained / "final", root / "edits" / "control" / "0003.png",
        prompt="make it green", height=32, width=64, num_inference_steps=2, guidance_scale=2.5, seed=9,
    )  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(result.images[0])), expected)


def test_kontext_loras_export_to_kohya_like_flux_ones(trained, tmp_path) -> None:
    result = export(trained, "kohya", tmp_path / "kontext-kohya.safetensors")
    assert result.original_modules and result.path.is_file()


def test_several_references_per_pair_train(trained) -> None:
    root = trained.parent.parent
    edits = root / "edits-two"
    shutil.copytree(root / "edits", edits)
    shutil.copytree(edits / "control", edits / "control_1")  # a second reference per pair
    recipe = load_recipe(_recipe(root, edits, "two"))
    preprocess(recipe, console=Console(quiet=True))
    trainer = Trainer(recipe, console=Console(quiet=True))
    trainer.setup()
    try:
        batch = next(trainer.batches())
        assert (
            batch["control_latents_0"].shape == batch["control_latents_1"].shape == (2, 16, 8, 8)
        )  # match_target: resized to the target
    finally:
        trainer.cleanup()
    result = Trainer(recipe, console=Console(quiet=True)).run()
    assert result.step == 2
    records = read_metrics(root / "two" / "run" / "metrics.jsonl")
    assert all(np.isfinite(r.get("loss", r.get("val_loss"))) for r in records)
