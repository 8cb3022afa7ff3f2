"""flowtune sample: the same pixels as plain diffusers, the metadata written with every image, and
one-line errors for bad checkpoints, LoRAs, sizes and prompt lists."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file, save_file

from flowtune.data.preprocess import preprocess
from flowtune.data.synthetic import make_shapes_dataset
from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.recipe import load_recipe
from flowtune.sample import (
    SampleSettings,
    check_lora,
    contact_sheet,
    read_prompts,
    sample,
    source_from_checkpoint,
    source_from_model,
)
from flowtune.tiny import make_tiny
from flowtune.train.model import LORA_WEIGHTS_NAME, read_lora_metadata
from flowtune.train.trainer import Trainer
from tests.helpers import assert_user_error, cli

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1 LoRA run (rank 4, alpha 8, dropout 0.1) trained 3 steps with a high learning
    rate, so the LoRA visibly changes the images; returns its output directory."""
    root = tmp_path_factory.mktemp("sample")
    model = make_tiny("flux", root / "tiny-flux")
    make_shapes_dataset(root / "dataset", 4, seed=3, sizes=[(64, 64)])
    (root / "recipe.yaml").write_text(
        f"model: {{family: flux, pretrained: '{model}', dtype: float32}}\n"
        "lora: {rank: 4, alpha: 8, dropout: 0.1, init: gaussian}\n"
        f"data: {{source: '{root / 'dataset'}', cache_dir: '{root / 'cache'}', resolution: 64,"
        " max_sequence_length: 16}\n"
        f"train: {{max_steps: 3, seed: 0, mixed_precision: 'no', output_dir: '{root / 'run'}'}}\n"
        "optimizer: {lr: 5.0e-2}\n"
        f"validation: {{prompts: ['{PROMPT}'], every: 0, seed: 11, steps: 2, height: 64, width: 48}}\n"
    )
    recipe = load_recipe(root / "recipe.yaml")
    preprocess(recipe, console=Console(quiet=True))
    Trainer(recipe, console=Console(quiet=True)).run()
    return root / "run"


def _diffusers_images(model_dir: Path, lora_dir: Path | None, seeds, scale: float = 1.0, **call) -> list:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model_dir, dtype=torch.float32)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"joint_attention_kwargs": {"scale": scale}} if scale != 1.0 else {}
    return [
        np.asarray(pipe(**call, **kwargs, generator=torch.Generator().manual_seed(s)).images[0])
        for s in seeds
    ]


def test_sample_from_a_checkpoint_gives_plain_diffusers_pixels_and_records_them(run, tmp_path) -> None:
    out = tmp_path / "out"
    result = cli(
        "sample", "--ckpt", str(run), "-p", PROMPT, "-p", "a blue square", "--seed", "7",
        "--num-images", "2", "--steps", "3", "--height", "48", "--width", "64", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    model_dir = run.parent / "tiny-flux"
    for p, prompt in enumerate([PROMPT, "a blue square"]):
        expected = _diffusers_images(
            model_dir, run / "final", [7, 8], prompt=prompt, height=48, width=64, num_inference_steps=3,
            guidance_scale=3.5, max_sequence_length=16,  # the recipe's: the length the LoRA learnt with
        )  # fmt: skip
        for j in range(2):
            got = Image.open(out / f"{2 * p + j:06d}.png")
            assert np.array_equal(np.asarray(got), expected[j])
            assert got.text["prompt"] == prompt and got.text["seed"] == str(7 + j)
            assert got.text["steps"] == "3" and got.text["guidance"] == "3.5"
            assert (got.text["width"], got.text["height"]) == ("64", "48")
            assert got.text["checkpoint"] == str(run / "final") and got.text["step"] == "3"
            assert json.loads(got.text["flowtune"])["seed"] == 7 + j
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"], r["seed"]) for r in records] == [
        ("000000.png", PROMPT, 7),
        ("000001.png", PROMPT, 8),
        ("000002.png", "a blue square", 7),
        ("000003.png", "a blue square", 8),
    ]
    assert Image.open(out / "grid.png").size[0] > 2 * 64


def test_a_checkpoint_s_recipe_gives_the_defaults_and_a_second_run_adds_images(run, tmp_path) -> None:
    source = source_from_checkpoint(run / "checkpoints" / "step-000003")
    assert source.prompts == [PROMPT] and source.step == 3
    settings = SampleSettings(**source.defaults)
    assert (settings.seed, settings.steps, settings.height, settings.width) == (11, 2, 64, 48)
    first = sample(source, source.prompts, settings, tmp_path)
    second = sample(source, source.prompts, settings, tmp_path)
    assert [p.name for p in first.images + second.images] == ["000000.png", "000001.png"]
    assert np.array_equal(np.asarray(Image.open(first.images[0])), np.asarray(Image.open(second.images[0])))
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2
    # Another copy of the base model (the recipe's path moved or relative): --model with --ckpt.
    moved = tmp_path / "moved-flux"
    shutil.copytree(run.parent / "tiny-flux", moved)
    third = sample(source_from_checkpoint(run, base_model=str(moved)), source.prompts, settings, tmp_path)
    assert Image.open(third.images[0]).text["model"] == str(moved)
    assert np.array_equal(np.asarray(Image.open(first.images[0])), np.asarray(Image.open(third.images[0])))


def test_block_offload_samples_the_same_pixels_with_the_text_encoders_freed_first(
    run, tmp_path, monkeypatch
) -> None:
    """``--block-offload 1``: every prompt is encoded before sampling and the text encoders are
    dropped, the transformer streams its other block from CPU memory, and the pixels are a plain
    sample's; more blocks than the model has is a one-line error before anything loads."""
    import flowtune.sample as sampling

    source = source_from_checkpoint(run)
    settings = SampleSettings(**source.defaults)
    prompts = [PROMPT, "a blue square", PROMPT]
    plain = sample(source, prompts, settings, tmp_path / "plain")
    seen = []
    generate = sampling.generate_frames

    def watched(pipe, job, *args):
        hooks = getattr(pipe.transformer, "flowtune_block_offload", None)
        seen.append((pipe.text_encoder, pipe.text_encoder_2, hooks is not None, "prompt" in job.inputs))
        return generate(pipe, job, *args)

    monkeypatch.setattr(sampling, "generate_frames", watched)
    source.block_offload = 1
    streamed = sample(source, prompts, settings, tmp_path / "streamed")
    assert seen == [(None, None, True, False)] * 3
    for a, b in zip(plain.images, streamed.images, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    source.block_offload = 5
    with pytest.raises(
        FlowtuneError, match=r"--block-offload 5 keeps more blocks .* than the model has \(4\)"
    ):
        sample(source, prompts, settings, tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_a_model_and_a_lora_file_at_a_lower_strength(run, tmp_path) -> None:
    model_dir = run.parent / "tiny-flux"
    source = source_from_model(str(model_dir), run / "final" / LORA_WEIGHTS_NAME)
    assert source.spec.name == "flux"
    settings = SampleSettings(seed=3, steps=2, height=32, width=32, lora_scale=0.5)
    result = sample(source, [PROMPT], settings, tmp_path)
    call = {"prompt": PROMPT, "height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 3.5}
    half = _diffusers_images(model_dir, run / "final", [3], scale=0.5, **call)[0]
    full = _diffusers_images(model_dir, run / "final", [3], **call)[0]
    got = np.asarray(Image.open(result.images[0]))
    assert np.array_equal(got, half) and not np.array_equal(got, full)
    assert Image.open(result.images[0]).text["lora_scale"] == "0.5"
    no_negative = dataclasses.replace(settings, negative_prompt="blurry")
    with pytest.raises(
        FlowtuneError, match="^flux samples without a negative prompt; leave out --negative-prompt$"
    ):
        sample(source, [PROMPT], no_negative, tmp_path / "refused")


def test_a_fully_fine_tuned_checkpoint_samples_with_its_own_transformer(run, tmp_path) -> None:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    recipe = load_recipe(
        run.parent / "recipe.yaml",
        [
            f"train.output_dir={tmp_path / 'full'}",
            "train.mode=full",
            "train.max_steps=1",
            "optimizer.lr=1e-3",
        ],
    )
    Trainer(recipe, console=Console(quiet=True)).run()
    source = source_from_checkpoint(tmp_path / "full")
    assert source.lora_file is None and source.transformer_dir is not None
    result = sample(source, [PROMPT], SampleSettings(seed=1, steps=2, height=32, width=32), tmp_path / "out")
    pipe = FluxPipeline.from_pretrained(
        run.parent / "tiny-flux",
        transformer=FluxTransformer2DModel.from_pretrained(tmp_path / "full" / "final" / "transformer"),
        dtype=torch.float32,
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPT, height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(1)
    )
    assert np.array_equal(np.asarray(Image.open(result.images[0])), np.asarray(expected.images[0]))


def test_checkpoint_loras_record_their_shape_and_sample_deterministically(run) -> None:
    metadata = read_lora_metadata(run / "final" / LORA_WEIGHTS_NAME)
    config = json.loads(metadata["lora_adapter_metadata"])
    # The scale alpha / rank = 2 is in the file's B (alpha = rank for every loader); the trained
    # alpha is in flowtune's own metadata.
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 4
    assert json.loads(metadata["flowtune.trained_lora"])["lora_alpha"] == 8
    assert "attn.to_q" in config["transformer.target_modules"]
    # Dropout is a training setting: recorded as 0 so that diffusers samples deterministically.
    assert config["transformer.lora_dropout"] == 0.0
    assert metadata["flowtune.family"] == "flux" and metadata["flowtune.step"] == "3"
    assert metadata["flowtune.base_model"] == str(run.parent / "tiny-flux")


def _rewrite_lora(source: Path, target: Path, edit_tensors=None, edit_metadata=None) -> Path:
    tensors = load_file(source)
    metadata = read_lora_metadata(source)
    if edit_tensors:
        tensors = edit_tensors(tensors)
    if edit_metadata:
        metadata = edit_metadata(metadata)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, target, metadata=metadata)
    return target


def test_loras_for_another_family_or_base_model_are_refused(run, tmp_path) -> None:
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(run.parent / "tiny-flux" / "transformer")
    spec = get_family("flux")
    lora = run / "final" / LORA_WEIGHTS_NAME
    assert check_lora(spec, transformer, lora, base_model=str(run.parent / "tiny-flux")) == []
    warnings = check_lora(spec, transformer, lora, base_model="someone/other-flux")
    assert warnings and "trained on" in warnings[0]

    other_family = _rewrite_lora(
        lora, tmp_path / "a.safetensors", edit_metadata=lambda m: {**m, "flowtune.family": "flux2"}
    )
    with pytest.raises(FlowtuneError, match="LoRA for the flux2 family"):
        check_lora(spec, transformer, other_family)

    def wider(tensors):
        key = next(k for k in tensors if k.endswith("single_transformer_blocks.0.attn.to_q.lora_A.weight"))
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 2)
        return tensors

    with pytest.raises(FlowtuneError, match="another base model.*single_transformer_blocks.0.attn.to_q"):
        check_lora(spec, transformer, _rewrite_lora(lora, tmp_path / "b.safetensors", edit_tensors=wider))

    def deeper(tensors):
        return {k.replace("transformer_blocks.0.", "transformer_blocks.7."): v for k, v in tensors.items()}

    with pytest.raises(FlowtuneError, match="does not have"):
        check_lora(spec, transformer, _rewrite_lora(lora, tmp_path / "c.safetensors", edit_tensors=deeper))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FlowtuneError, match="not a safetensors LoRA"):
        check_lora(spec, transformer, tmp_path / "junk.safetensors")


def test_user_errors_are_one_line_with_exit_status_2(run, tmp_path) -> None:
    assert_user_error(cli("sample", "--ckpt", str(tmp_path / "missing"), "-p", "x"), "no checkpoint at")
    assert_user_error(
        cli("sample", "--ckpt", str(run), "-p", "x", "--block-offload", "two"),
        "--block-offload 'two'",
        "none",
    )
    assert_user_error(cli("sample", "--ckpt", str(run), "-p", "x", "--height", "60"), "height 60", "16")
    (tmp_path / "prompts.txt").write_text("\n\n")
    assert_user_error(
        cli(
            "sample",
            "--model",
            str(run.parent / "tiny-flux"),
            "--prompts-file",
            str(tmp_path / "prompts.txt"),
        ),
        "no prompts",
    )
    assert_user_error(cli("sample", "-p", "x"), "--ckpt", "--model")
    other = _rewrite_lora(
        run / "final" / LORA_WEIGHTS_NAME, tmp_path / "other.safetensors",
        edit_metadata=lambda m: {**m, "flowtune.family": "flux2"},
    )  # fmt: skip
    assert_user_error(
        cli("sample", "--model", str(run.parent / "tiny-flux"), "--lora", str(other), "-p", "x"),
        "flux2 family",
    )


def test_prompts_files_and_settings_are_checked() -> None:
    with pytest.raises(FlowtuneError, match="empty"):
        read_prompts(["a cat", "  "])
    with pytest.raises(FlowtuneError, match="cannot read the prompts file"):
        read_prompts([], Path("/nonexistent/prompts.txt"))
    spec = get_family("flux")
    for bad, match in (
        (SampleSettings(width=1000), "width 1000"),
        (SampleSettings(steps=0), "steps"),
        (SampleSettings(num_images=0), "num-images"),
    ):
        with pytest.raises(FlowtuneError, match=match):
            bad.check(spec)


def test_prompts_file_lines_follow_the_command_line_prompts(tmp_path) -> None:
    (tmp_path / "p.txt").write_text("a dog\n\n  a cat on a mat  \n")
    assert read_prompts(["first"], tmp_path / "p.txt") == ["first", "a dog", "a cat on a mat"]


def test_contact_sheet_lays_out_captioned_cells() -> None:
    images = [Image.new("RGB", (64, 48), c) for c in ("red", "green", "blue")]
    captions = ["short", "a much longer caption " * 10, "third"]
    sheet = contact_sheet(images, captions, columns=3)
    wide = contact_sheet(images, captions)  # about square: 2 columns, 2 rows
    assert sheet.width > sheet.height and wide.height > sheet.height
    # The first cell shows the (scaled-up) red image.
    assert sheet.getpixel((8 + 128, 8 + 128)) == (255, 0, 0)


def test_running_out_of_memory_is_a_message_and_keeps_the_images_made(run, tmp_path, monkeypatch) -> None:
    import flowtune.sample as sampling

    real = sampling.generate_frames
    calls = []

    def generate_frames(pipe, job, settings, spec):
        calls.append(job.seed)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(pipe, job, settings, spec)

    monkeypatch.setattr(sampling, "generate_frames", generate_frames)
    source = source_from_checkpoint(run)
    with pytest.raises(FlowtuneError, match="out of memory on cpu after 1 of 3 images.*--cpu-offload"):
        sample(source, [PROMPT], SampleSettings(steps=1, height=32, width=32, num_images=3), tmp_path)
    assert [p.name for p in tmp_path.glob("*.png")] == ["000000.png"]
