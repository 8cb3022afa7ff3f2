"""Validation during training: images from cached prompt embeddings equal plain diffusers with the
checkpoint's LoRA, val_loss is fixed and comparable, and validating leaves training unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file

from flowtune.data.preprocess import preprocess
from flowtune.data.synthetic import make_shapes_dataset
from flowtune.flow_matching import create_pipeline
from flowtune.recipe import load_recipe
from flowtune.tiny import make_tiny
from flowtune.train.metrics import read_metrics
from flowtune.train.model import LORA_WEIGHTS_NAME
from flowtune.train.trainer import Trainer
from flowtune.train.validation import Validator

PROMPTS = ["a red circle on a white background", "a green triangle"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1 model, 12 shapes in two buckets and their cache, with two validation prompts."""
    root = tmp_path_factory.mktemp("validation")
    model = make_tiny("flux", root / "tiny-flux")
    make_shapes_dataset(root / "dataset", 12, seed=2, sizes=[(64, 64), (96, 64)])
    (root / "recipe.yaml").write_text(
        f"model: {{family: flux, pretrained: '{model}', dtype: float32}}\n"
        "lora: {rank: 4, alpha: 4, dropout: 0.1}\n"  # dropout draws from torch's global RNG
        f"data: {{source: '{root / 'dataset'}', cache_dir: '{root / 'cache'}', resolution: 64,"
        " max_sequence_length: 16, validation_split: 0.25}\n"
        "train: {max_steps: 4, seed: 0, mixed_precision: 'no', checkpoint_every: 2, log_every: 1,"
        " keep_last: null}\n"
        "optimizer: {lr: 1.0e-3}\n"
        "lr_scheduler: {name: constant}\n"
        f"validation: {{prompts: {PROMPTS}, every: 2, seed: 5, steps: 3, height: 64, width: 64}}\n"
    )
    preprocess(load_recipe(root / "recipe.yaml"), console=Console(quiet=True))
    return root


def _train(env: Path, out: Path, *overrides: str):
    recipe = load_recipe(env / "recipe.yaml", [f"train.output_dir={out}", *overrides])
    return Trainer(recipe, console=Console(record=True, width=200)).run()


def _train_losses(out: Path) -> list[tuple[int, float, float]]:
    return [
        (r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r
    ]


@pytest.fixture(scope="module")
def validated(env: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run validating (images and val_loss) after steps 2 and 4."""
    out = tmp_path_factory.mktemp("validated") / "run"
    _train(env, out)
    return out


def test_validating_leaves_the_training_run_unchanged(env, validated, tmp_path) -> None:
    # Without prompts and with validation.every=0 the other run validates only after its last step.
    plain = _train(env, tmp_path / "plain", "validation.prompts=[]", "validation.every=0")
    assert _train_losses(validated) == _train_losses(tmp_path / "plain")
    a = load_file(validated / "final" / LORA_WEIGHTS_NAME)
    b = load_file(plain.final_dir / LORA_WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_val_loss_is_logged_at_every_validation_step(validated) -> None:
    records = read_metrics(validated / "metrics.jsonl")
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert all(r["val_loss"] > 0 for r in val)
    assert val[0]["val_loss"] != val[1]["val_loss"]  # the weights changed in between


def test_validation_images_are_written_per_step_with_a_grid(validated) -> None:
    for step in (2, 4):
        folder = validated / "samples" / f"step-{step:06d}"
        assert sorted(p.name for p in folder.iterdir()) == [
            "000000.png",
            "000001.png",
            "grid.png",
            "samples.jsonl",
        ]
        image = Image.open(folder / "000001.png")
        assert image.size == (64, 64)
        assert (
            image.text["prompt"] == PROMPTS[1]
            and image.text["seed"] == "5"
            and image.text["step"] == str(step)
        )


def test_validation_images_equal_diffusers_with_the_checkpoint_s_lora(env, validated) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(env / "tiny-flux", dtype=torch.float32)
    pipe.load_lora_weights(validated / "checkpoints" / "step-000002")
    pipe.set_progress_bar_config(disable=True)
    for i, prompt in enumerate(PROMPTS):
        expected = pipe(
            prompt=prompt,
            height=64,
            width=64,
            num_inference_steps=3,
            guidance_scale=3.5,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(5),
        ).images[0]
        got = Image.open(validated / "samples" / "step-000002" / f"{i:06d}.png")
        assert np.array_equal(np.asarray(got), np.asarray(expected))


def _validator(env: Path, tmp_path: Path, *overrides: str) -> tuple[Trainer, Validator]:
    recipe = load_recipe(env / "recipe.yaml", [f"train.output_dir={tmp_path / 'run'}", *overrides])
    trainer = Trainer(recipe, console=Console(quiet=True))
    trainer.setup()
    return trainer, trainer.validator


def test_val_loss_depends_only_on_the_weights_and_the_held_out_items(env, tmp_path) -> None:
    trainer, validator = _validator(env, tmp_path)
    try:
        assert len(validator.heldout) == 3  # 12 items, split 0.25 by key hash
        first = validator.loss(trainer.flow, trainer.model, trainer.device)
        assert validator.loss(trainer.flow, trainer.model, trainer.device) == first  # fixed noise
        other_flow = create_pipeline(
            "flux",
            {},
            flow_shift=1.0,
            timestep_sampling="uniform",
            loss_weighting_scheme="bsmntw",
            cfg_dropout_prob=0.5,
        )
        assert validator.loss(other_flow, trainer.model, trainer.device) == pytest.approx(first, rel=1e-6)
        validator.recipe.train.batch_size = 2  # batching does not change the value
        assert validator.loss(trainer.flow, trainer.model, trainer.device) == pytest.approx(first, rel=1e-6)
    finally:
        trainer.cleanup()


def test_a_run_without_held_out_items_or_prompts_does_not_validate(env, tmp_path) -> None:
    trainer, validator = _validator(env, tmp_path, "data.validation_split=0", "validation.prompts=[]")
    try:
        assert not validator.enabled and not validator.due(4, last=True)
    finally:
        trainer.cleanup()


def test_trackers_receive_val_loss_and_the_images_under_bf16_autocast(env, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _train(env, out, "train.max_steps=2", "train.mixed_precision=bf16", "logging.trackers=[tensorboard]")
    events = EventAccumulator(
        str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0}
    )
    events.Reload()
    assert "val_loss" in events.Tags()["scalars"] and "loss" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("val_loss")] == [2]
    images = events.Images("validation")
    assert [e.step for e in images] == [2]
    assert (images[0].width, images[0].height) == (2 * 64, 64)  # the two prompts' images, tiled
    assert sorted(p.name for p in (out / "samples" / "step-000002").glob("*.png")) == [
        "000000.png",
        "000001.png",
        "grid.png",
    ]


def test_validation_images_out_of_memory_are_skipped_with_a_warning(env, tmp_path, monkeypatch) -> None:
    def out_of_memory(self, model, step, device, write=True):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Validator, "images", out_of_memory)
    console = Console(record=True, width=200)
    recipe = load_recipe(env / "recipe.yaml", [f"train.output_dir={tmp_path / 'run'}"])
    result = Trainer(recipe, console=console).run()
    assert result.step == 4  # training went on to the end
    assert "validation images of step 2 skipped: out of memory" in console.export_text()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r] == [2, 4]


def test_a_family_whose_prompts_use_the_references_samples_with_its_text_encoders(
    env, tmp_path, monkeypatch
) -> None:
    """``FamilyEncoder.text_uses_references`` (Qwen-Image-Edit): nothing can be cached for the
    validation prompts, so the pipeline is loaded with its text encoders and encodes them (at
    ``data.max_sequence_length``), on the accelerator only while sampling; the images are still
    the plain pipeline's."""
    from diffusers import FluxPipeline

    from flowtune.families import get_family

    monkeypatch.setattr(get_family("flux").load_encoder_class(), "text_uses_references", True)
    trainer, validator = _validator(env, tmp_path, "data.validation_split=0")
    moves = []
    original = validator._text_encoders_to
    monkeypatch.setattr(
        validator, "_text_encoders_to", lambda device: (moves.append(str(device)), original(device))
    )
    try:
        assert validator._prompt_inputs == [{"prompt": p} for p in PROMPTS]
        images = validator.images(trainer.model, 0, trainer.device, write=False)
        assert validator._pipe.text_encoder is not None and validator._pipe.tokenizer_2 is not None
        # On the accelerator only while sampling: back in CPU memory for the training steps.
        assert moves == [str(trainer.device), "cpu"]
        assert validator._pipe.text_encoder.device.type == "cpu"
    finally:
        trainer.cleanup()
    pipe = FluxPipeline.from_pretrained(env / "tiny-flux", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt=PROMPTS[0], height=64, width=64, num_inference_steps=3, guidance_scale=3.5,
        max_sequence_length=16, generator=torch.Generator().manual_seed(5),
    ).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(images[0]), np.asarray(expected))
