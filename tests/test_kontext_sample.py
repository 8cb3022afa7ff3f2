"""flowtune sample for FLUX.1 Kontext: the reference image goes through FluxKontextPipeline exactly
as plain diffusers takes it (pixel-identical), resized per data.control_resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.sample import SampleSettings, SampleSource, sample, source_from_model
from flowtune.tiny import make_tiny
from tests.helpers import assert_user_error, cli


@pytest.fixture(scope="module")
def kontext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kontext-sample")
    make_tiny("flux-kontext", root / "tiny-kontext")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(root / "source.png")
    return root


def _diffusers(model_dir: Path, source: Path, **call) -> np.ndarray:
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(source).convert("RGB")
    if not call.pop("auto_resize"):
        image = pipe.image_processor.resize(image, call["height"], call["width"])
        call["_auto_resize"] = False
    result = pipe(image=image, generator=torch.Generator().manual_seed(call.pop("seed")), **call)
    return np.asarray(result.images[0])


@pytest.mark.parametrize("control_resize", ["kontext", "match_target"])
def test_sampling_an_edit_equals_plain_diffusers(kontext, tmp_path, control_resize) -> None:
    source = source_from_model(str(kontext / "tiny-kontext"), None)
    assert source.spec.name == "flux-kontext"
    source.control_resize = control_resize
    settings = SampleSettings(seed=4, steps=2, height=32, width=48, guidance=2.5)
    result = sample(source, ["make it blue"], settings, tmp_path, images=[kontext / "source.png"])
    expected = _diffusers(
        kontext / "tiny-kontext",
        kontext / "source.png",
        prompt="make it blue",
        height=32,
        width=48,
        max_area=32 * 48,
        num_inference_steps=2,
        guidance_scale=2.5,
        seed=4,
        auto_resize=control_resize == "kontext",
    )
    got = Image.open(result.images[0])
    assert got.size == (48, 32)
    assert np.array_equal(np.asarray(got), expected)
    assert got.text["image"] == str(kontext / "source.png")


def test_reference_images_are_required_and_checked(kontext, tmp_path) -> None:
    source = source_from_model(str(kontext / "tiny-kontext"), None)
    settings = SampleSettings(steps=1, height=32, width=32)
    with pytest.raises(FlowtuneError, match="edit a reference image: give --image"):
        sample(source, ["make it blue"], settings, tmp_path)
    with pytest.raises(FlowtuneError, match="2 images for 3 prompts"):
        sample(source, ["a", "b", "c"], settings, tmp_path, images=[kontext / "source.png"] * 2)
    with pytest.raises(FlowtuneError, match="no image file at"):
        sample(source, ["a"], settings, tmp_path, images=[tmp_path / "missing.png"])
    flux = SampleSource(spec=get_family("flux"), pretrained="unused")
    with pytest.raises(FlowtuneError, match="take no reference image"):
        sample(flux, ["a"], settings, tmp_path, images=[kontext / "source.png"])


def test_the_command_line_takes_image(kontext, tmp_path) -> None:
    model = str(kontext / "tiny-kontext")
    result = cli(
        "sample", "--model", model, "--image", str(kontext / "source.png"), "-p", "make it blue",
        "--steps", "1", "--height", "32", "--width", "32", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "000000.png").is_file()
    assert_user_error(cli("sample", "--model", model, "-p", "make it blue"), "give --image")
    # a LoRA-less run with --control-resize match_target equals the library call with that mode
    result = cli(
        "sample", "--model", model, "--image", str(kontext / "source.png"), "-p", "make it blue",
        "--steps", "1", "--height", "32", "--width", "48", "--control-resize", "match_target",
        "--out", str(tmp_path / "matched"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = _diffusers(
        kontext / "tiny-kontext", kontext / "source.png", prompt="make it blue", height=32, width=48,
        max_area=32 * 48, num_inference_steps=1, guidance_scale=3.5, seed=42, auto_resize=False,
    )  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(tmp_path / "matched" / "000000.png")), expected)
    assert_user_error(
        cli(
            "sample",
            "--model",
            model,
            "--image",
            str(kontext / "source.png"),
            "-p",
            "x",
            "--control-resize",
            "crop",
        ),
        "--control-resize 'crop'",
    )


def test_make_dataset_writes_edit_pairs(tmp_path) -> None:
    result = cli(
        "make-dataset", str(tmp_path / "edits"), "--edit-pairs", "--count", "2", "--control-size", "48x64"
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "edits" / "images").iterdir()) == [
        "0000.png",
        "0000.txt",
        "0001.png",
        "0001.txt",
    ]
    assert Image.open(tmp_path / "edits" / "control" / "0000.png").size == (48, 64)
    assert_user_error(cli("make-dataset", str(tmp_path / "x"), "--control-size", "48x64"), "--edit-pairs")
