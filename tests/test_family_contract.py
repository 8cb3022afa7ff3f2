"""What every registered model family must do, end to end on its tiny model (one parametrized run
per family of :mod:`flowtune.families`): ``flowtune make-tiny`` -> ``make-dataset`` ->
``preprocess`` -> a few LoRA training steps, stopped by a signal and resumed bit for bit ->
``flowtune sample`` equal to the family's own diffusers pipeline with the LoRA loaded -> the
LoRA's export loading back in that pipeline with the same images.  Video families
(``FamilySpec.frame_granularity`` > 0) train on clips (``make-dataset --video``) and sample clips,
compared frame by frame.

A new family passes this file once it is registered, plus one line in ``REFERENCE_CALLS`` if it
needs reference images."""

from __future__ import annotations

import inspect
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file

from flowtune.families import FamilySpec, family_names, get_family
from flowtune.interop import export
from flowtune.recipe import load_recipe
from flowtune.train.metrics import read_metrics
from flowtune.train.model import LORA_WEIGHTS_NAME
from flowtune.train.signals import TrainingInterrupted
from flowtune.train.trainer import Trainer
from tests.helpers import cli, small_reference_areas

PROMPT = "a blue square"
TEXT_TOKENS = 48  # room for FLUX.2's system message before the caption
HEIGHT, WIDTH = 32, 48  # sampling size (not square, so that height and width cannot be swapped)
GUIDANCE = 2.5  # the family's guidance_argument (above 1: classifier-free guidance is on where it is one)


# Video families (FamilySpec.frame_granularity > 0) sample clips of this many frames (granularity
# + 1: two latent frames), written as an MP4 and a frame strip, the PNG compared here.
def _frames(spec: FamilySpec) -> int | None:
    return spec.frame_granularity + 1 if spec.frame_granularity else None


def _match_target_kontext(image: Image.Image, pipe: Any, height: int, width: int) -> dict[str, Any]:
    """FluxKontextPipeline's inputs for a reference resized to the target (control_resize:
    match_target), as flowtune sends it."""
    return {
        "image": pipe.image_processor.resize(image.convert("RGB"), height, width),
        "_auto_resize": False,
        "max_area": height * width,
    }


# Families that cannot generate without a reference image: how their diffusers pipeline takes one
# (given the image, the pipeline and the target size), as flowtune's data.control_resize
# match_target sends it.
def _match_target_qwen_edit(image: Image.Image, pipe: Any, height: int, width: int) -> dict[str, Any]:
    """QwenImageEditPlusPipeline's inputs for a reference resized to the target (control_resize:
    match_target), as flowtune sends it: a list of references."""
    return {"image": [pipe.image_processor.resize(image.convert("RGB"), height, width)]}


REFERENCE_CALLS: dict[str, Callable[..., dict[str, Any]]] = {
    "flux-kontext": _match_target_kontext,
    "qwen-image-edit": _match_target_qwen_edit,
}


def _needs_references(spec: FamilySpec) -> bool:
    return spec.uses_edit_pairs(None)


def test_every_family_that_needs_references_says_how_its_pipeline_takes_them() -> None:
    assert {name for name in family_names() if _needs_references(get_family(name))} == set(REFERENCE_CALLS)


@pytest.mark.parametrize("name", family_names())
def test_declared_adapter_arguments_are_the_adapter_s_constructor_arguments(name: str) -> None:
    import inspect

    spec = get_family(name)
    if spec.adapter_arguments is None:
        pytest.skip(f"{name} declares no adapter arguments (recipes are checked by building its adapter)")
    parameters = inspect.signature(spec.load_adapter_class()).parameters  # the constructor's call
    found = {n: p.annotation for n, p in parameters.items()}
    assert found == dict(spec.adapter_arguments)  # annotations are strings (postponed evaluation)


def _recipe(root: Path, spec: FamilySpec) -> Path:
    path = root / "recipe.yaml"
    resize = ", control_resize: match_target" if _needs_references(spec) else ""
    images = f", images: ['{root / 'data' / 'control' / '0000.png'}']" if _needs_references(spec) else ""
    clips = ""
    if _frames(spec) is not None:  # trains on clips of that many frames and samples them
        images += f", frames: {_frames(spec)}"
        clips = f", frames: {_frames(spec)}"
    path.write_text(
        f"model: {{family: {spec.name}, pretrained: '{root / 'tiny'}', dtype: float32}}\n"
        "lora: {rank: 4, alpha: 8, init: gaussian}\n"
        f"data: {{source: '{root / 'data'}', cache_dir: '{root / 'cache'}', resolution: 32,"
        f" max_sequence_length: {TEXT_TOKENS}{resize}{clips}}}\n"
        "train: {max_steps: 3, seed: 0, mixed_precision: 'no', checkpoint_every: 3, batch_size: 2,"
        " log_every: 1}\n"
        f"validation: {{prompts: ['{PROMPT}'], every: 0, seed: 5, steps: 2, guidance: {GUIDANCE},"
        f" height: {HEIGHT}, width: {WIDTH}{images}}}\n"
        "optimizer: {lr: 5.0e-2}\n"
        "lr_scheduler: {name: constant}\n"
    )
    return path


def _train(recipe: Path, out: Path, stop_after: int | None = None, *overrides: str) -> Any:
    trainer = Trainer(
        load_recipe(recipe, [f"train.output_dir={out}", *overrides]), console=Console(quiet=True)
    )
    if stop_after is not None:
        original = trainer.train_step

        def train_step(batches):
            result = original(batches)
            if trainer.step + 1 == stop_after:
                trainer.stop.request(signal.SIGTERM)
            return result

        trainer.train_step = train_step
    return trainer.run()


@pytest.fixture(scope="module", autouse=True)
def _small_reference_areas():
    """Edit pipelines that scale references to a fixed area do it at a CPU test's size."""
    with small_reference_areas():
        yield


@pytest.fixture(scope="module", params=family_names())
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A family's tiny model, dataset and cache, made through the CLI, and its recipe."""
    spec = get_family(request.param)
    root = tmp_path_factory.mktemp(f"contract-{spec.name}")
    made = cli("make-tiny", spec.name, root / "tiny")
    assert made.returncode == 0, made.stderr
    kind = ["--edit-pairs"] if _needs_references(spec) else []
    if _frames(spec) is not None:  # clips of a moving shape
        kind = ["--video", "--frames", str(_frames(spec))]
    made = cli("make-dataset", root / "data", "--count", "4", "--size", "32x32", *kind)
    assert made.returncode == 0, made.stderr
    recipe = _recipe(root, spec)
    made = cli("preprocess", recipe)
    assert made.returncode == 0, made.stderr
    return {"spec": spec, "root": root, "recipe": recipe}


@pytest.fixture(scope="module")
def run(family: dict[str, Any]) -> Path:
    """The family's 3-step LoRA run, stopped by SIGTERM after step 2 and resumed; checked equal, bit
    for bit, to the same run uninterrupted."""
    root, recipe = family["root"], family["recipe"]
    whole = _train(recipe, root / "whole")
    with pytest.raises(TrainingInterrupted) as info:
        _train(recipe, root / "split", 2)
    assert info.value.step == 2
    resumed = _train(recipe, root / "split", None, "train.resume=latest")
    assert (resumed.start_step, resumed.step) == (2, 3)

    def losses(out: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]

    assert losses(root / "split") == losses(root / "whole") and len(losses(root / "whole")) == 3
    a, b = load_file(whole.final_dir / LORA_WEIGHTS_NAME), load_file(resumed.final_dir / LORA_WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return root / "split"


def _pipeline(family: dict[str, Any], lora: Path | None) -> Any:
    import diffusers

    spec = family["spec"]
    # Components the family loads its own way (FamilyEncoder.pipeline_components: e.g.
    # Qwen-Image-Edit's processor, which transformers cannot load without torchvision) are set
    # after loading, as flowtune's load_pipeline sets them.
    own = spec.load_encoder_class().pipeline_components(family["root"] / "tiny", ())
    pipe = getattr(diffusers, spec.pipeline_class).from_pretrained(
        family["root"] / "tiny", torch_dtype=torch.float32, **dict.fromkeys(own)
    )
    pipe.register_modules(**own)
    if lora is not None:
        _load_lora(pipe, lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_lora(pipe: Any, lora: Path) -> None:
    """The LoRA loaded as diffusers loads it: the pipeline's ``load_lora_weights``, or, for a
    pipeline without a LoRA loader mixin (``FamilySpec.lora_loader``), its transformer's
    ``load_lora_adapter``."""
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(lora)
    else:
        lora = Path(lora)
        file = lora / LORA_WEIGHTS_NAME if lora.is_dir() else lora
        pipe.transformer.load_lora_adapter(str(file), prefix="transformer")


def _unload_lora(pipe: Any) -> None:
    if hasattr(pipe, "unload_lora_weights"):
        pipe.unload_lora_weights()
    else:
        pipe.transformer.unload_lora()


def _images(family: dict[str, Any], pipe: Any, seed: int = 5) -> np.ndarray:
    spec = family["spec"]
    extra = {}
    if _needs_references(spec):
        control = Image.open(family["root"] / "data" / "control" / "0000.png")
        extra = REFERENCE_CALLS[spec.name](control, pipe, HEIGHT, WIDTH)
    if spec.negative_prompt is not None:  # classifier-free guidance against the family's default
        extra["negative_prompt"] = spec.negative_prompt
    extra.update(spec.guidance_inputs(pipe, GUIDANCE))
    if "max_sequence_length" in inspect.signature(pipe.__call__).parameters:
        extra["max_sequence_length"] = TEXT_TOKENS
    if _frames(spec) is not None:  # video pipelines return numpy frames unless asked for PIL
        extra.update(num_frames=_frames(spec), output_type="pil")
    output = pipe(
        prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed), **extra,
    )  # fmt: skip
    if _frames(spec) is not None:  # the clip's frames side by side, as flowtune's frame strip
        return np.concatenate([np.asarray(frame) for frame in output.frames[0]], axis=1)
    return np.asarray(output.images[0])


def test_sample_equals_the_family_pipeline_with_the_lora(family, run, tmp_path) -> None:
    image = []
    if _needs_references(family["spec"]):
        image = ["--image", str(family["root"] / "data" / "control" / "0000.png")]
    if _frames(family["spec"]) is not None:
        image = ["--frames", str(_frames(family["spec"]))]
    out = tmp_path / "out"
    result = cli(
        "sample", "--ckpt", run, "-p", PROMPT, "--seed", "5", "--steps", "2", "--guidance", str(GUIDANCE),
        "--height", str(HEIGHT), "--width", str(WIDTH), "--out", out, *image,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = Image.open(out / "000000.png")
    assert got.text["family"] == family["spec"].name
    expected = _images(family, _pipeline(family, run / "final"))
    assert np.array_equal(np.asarray(got), expected)
    assert not np.array_equal(expected, _images(family, _pipeline(family, None)))  # the LoRA matters


def test_validation_images_equal_the_family_pipeline_with_the_lora(family, run) -> None:
    got = Image.open(run / "samples" / "step-000003" / "000000.png")
    assert np.array_equal(np.asarray(got), _images(family, _pipeline(family, run / "final")))


def test_the_exported_lora_loads_back_with_the_same_images(family, run, tmp_path) -> None:
    pipe = _pipeline(family, run / "final")
    from_checkpoint = _images(family, pipe)
    path = export(run, "diffusers", tmp_path / "lora.safetensors").path
    _unload_lora(pipe)
    _load_lora(pipe, path)
    assert np.array_equal(_images(family, pipe), from_checkpoint)
    # The original-layout files (diffusers' loaders of those assume the full-size model's widths;
    # tests/test_export.py and tests/test_flux2_export.py check them against its converters).
    if family["spec"].lora_original_names is not None:
        for fmt in ("kohya", "comfyui"):
            result = export(run, fmt, tmp_path / f"{fmt}.safetensors")
            assert result.path.is_file() and 0 < result.original_modules <= result.modules, fmt
