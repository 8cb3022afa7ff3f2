"""Wan image-to-video (``wan``): Wan 2.1 I2V (``WanImageToVideoPipeline``: mask and condition
channels, CLIP image tokens) and Wan 2.2 TI2V-5B (``expand_timesteps``: the clean first latent
frame in the latents, per-token timesteps).  The tiny pipelines, the cached condition latents and
image embeddings equal to the pipeline's own functions, the adapter's transformer inputs equal to
the pipelines' at the same step (image-to-video and text-to-video samples), and a short
image-to-video LoRA run whose validation clip and ``flowtune sample --image`` clip equal the
pipeline's with the LoRA, frame for frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtune.encoders.base import EncoderSettings, create_encoder, load_pipeline
from flowtune.families import get_family
from flowtune.families.wan.adapter import WanAdapter
from flowtune.families.wan.encoder import WanEncoder
from flowtune.families.wan.tiny import (
    CLIP_HIDDEN,
    I2V_IN_CHANNELS,
    TI2V_LATENT_CHANNELS,
    build_tiny_wan_i2v,
    build_tiny_wan_ti2v,
)
from flowtune.flow_matching import FlowMatchingContext
from flowtune.flow_matching.adapters.base import ExampleSize
from tests.helpers import transformer_calls

SPEC = get_family("wan")
TEXT_TOKENS = 10
FRAMES = 5


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wan-i2v") / "i2v"
    build_tiny_wan_i2v(out)
    return out


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wan-ti2v") / "ti2v"
    build_tiny_wan_ti2v(out)
    return out


def _pipe(model: Path, class_name: str | None = None):
    """The folder's own pipeline class through flowtune's loading, or ``class_name``."""
    import diffusers

    if class_name is None:
        return load_pipeline(SPEC, model, dtype=torch.float32, device="cpu")
    pipe = getattr(diffusers, class_name).from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def i2v_pipe(i2v_dir: Path):
    """WanImageToVideoPipeline of the Wan 2.1 I2V folder, through flowtune's loading."""
    return _pipe(i2v_dir)


@pytest.fixture(scope="module")
def ti2v_i2v_pipe(ti2v_dir: Path):
    """WanImageToVideoPipeline of the TI2V folder (saved as WanPipeline)."""
    return _pipe(ti2v_dir, "WanImageToVideoPipeline")


def _encoder(model: Path) -> WanEncoder:
    settings = EncoderSettings(dtype="float32", max_sequence_length=TEXT_TOKENS, latent_dist="mode")
    encoder = create_encoder(SPEC, model, settings, device="cpu")
    encoder.load(images=True, texts=True)
    return encoder


def _clip(height: int, width: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(FRAMES)]


def _context(noisy, latents, t, batch, i2v) -> FlowMatchingContext:
    return FlowMatchingContext(
        noisy_latents=noisy, latents=latents, timesteps=t, sigma=t / 1000,
        task_type="i2v" if bool(i2v.any()) else "t2v", data_type="video", device=torch.device("cpu"),
        dtype=torch.float32, batch=batch, i2v_mask=i2v,
    )  # fmt: skip


def _first_step(encoder: WanEncoder, pipe, prompt: str, **call) -> tuple[dict, dict, torch.Tensor]:
    """The pipeline's first transformer call (conditional pass) from the encoder's cached
    prompt and empty negative prompt, its output, and the cached prompt's batch fields."""
    text = encoder.encode_prompts([prompt, ""])
    rows = [
        {"text_embeddings": r[None], "text_length": text["text_length"][:1]} for r in text["text_embeddings"]
    ]
    calls, outputs = transformer_calls(
        pipe, **WanEncoder.prompt_inputs(rows[0]), **WanEncoder.negative_inputs(rows[1]), num_frames=FRAMES,
        num_inference_steps=1, guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(0),
        **call,
    )  # fmt: skip
    return calls[0], rows[0], outputs[0]


def _assert_same_call(ours: dict, theirs: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key].to(ours[key].dtype)), key


# ------------------------------------------------------------------------------ tiny pipelines


def test_tiny_builders_load_with_the_pipelines(i2v_dir: Path, ti2v_dir: Path) -> None:
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(i2v_dir)
    config = pipe.transformer.config
    assert (config.in_channels, config.out_channels, config.image_dim) == (I2V_IN_CHANNELS, 16, CLIP_HIDDEN)
    assert pipe.image_encoder is not None and not pipe.config.expand_timesteps
    # TI2V: saved as WanPipeline (as the hub model), loadable for image-to-video too.
    pipe = WanImageToVideoPipeline.from_pretrained(ti2v_dir)
    assert pipe.config.expand_timesteps and pipe.image_encoder is None
    assert pipe.transformer.config.in_channels == pipe.vae.config.z_dim == TI2V_LATENT_CHANNELS
    assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (16, 4)


# ------------------------------------------------------------------------- Wan 2.1 I2V


@pytest.fixture(scope="module")
def i2v_encoder(i2v_dir: Path) -> WanEncoder:
    return _encoder(i2v_dir)


@torch.no_grad()
def test_i2v_cached_condition_and_inputs_equal_the_pipeline_s(i2v_pipe, i2v_encoder: WanEncoder) -> None:
    """WanImageToVideoPipeline's first step from the clip's first frame against the cached
    condition latents and CLIP embeddings and the adapter's inputs; a sample drawn text-to-video
    (i2v_mask False) is conditioned all the same (an image-to-video-only checkpoint)."""
    assert i2v_encoder.image_fields == {
        "video_latents": False,
        "condition_latents": False,
        "image_embeds": False,
    }
    pipe = i2v_pipe
    assert type(pipe).__name__ == "WanImageToVideoPipeline"
    clip = _clip(32, 48)
    call, text, output = _first_step(i2v_encoder, pipe, "a blue square", image=clip[0], height=32, width=48)
    cached = i2v_encoder.encode_videos([clip])
    hidden = call["hidden_states"]
    assert hidden.shape == (1, I2V_IN_CHANNELS, 2, 4, 6)
    assert torch.equal(cached["condition_latents"], hidden[:, 20:])
    assert torch.equal(cached["image_embeds"], call["encoder_hidden_states_image"])
    # Beyond the first frame the condition is not the clip's (the causal VAE saw black frames).
    assert not torch.allclose(cached["condition_latents"][:, :, 1], cached["video_latents"][:, :, 1])

    batch = {**text, **cached}
    t = pipe.scheduler.timesteps[0].expand(1).float()
    for i2v in (True, False):
        context = _context(hidden[:, :16], cached["video_latents"], t, batch, torch.tensor([i2v]))
        inputs = WanAdapter().prepare_inputs(context)
        _assert_same_call(
            inputs,
            call,
            ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image"),
        )
        assert WanAdapter().loss_mask(context) is None
    assert torch.equal(WanAdapter().forward(pipe.transformer, inputs), output)


def test_i2v_example_batch_runs_a_training_step(i2v_dir: Path) -> None:
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(i2v_dir / "transformer")
    adapter = WanAdapter()
    batch = adapter.example_batch(dict(transformer.config), 2, 32, 48, text_tokens=7, frames=FRAMES)
    assert batch["condition_latents"].shape == batch["video_latents"].shape == (2, 16, 2, 4, 6)
    assert batch["image_embeds"].shape == (2, 257, CLIP_HIDDEN)
    latents = batch["video_latents"]
    context = _context(latents, latents, torch.tensor([100.0, 900.0]), batch, torch.tensor([True, False]))
    context.cfg_dropout_mask = torch.tensor([True, False])
    inputs = adapter.prepare_inputs(context)
    assert not inputs["encoder_hidden_states"][0].any()  # dropped caption; the image stays
    assert torch.equal(inputs["encoder_hidden_states_image"], batch["image_embeds"])
    with torch.no_grad():
        assert adapter.forward(transformer, inputs).shape == latents.shape


# ------------------------------------------------------------------------ Wan 2.2 TI2V


@torch.no_grad()
def test_ti2v_inputs_equal_the_pipelines_for_i2v_and_t2v_samples(ti2v_dir: Path, ti2v_i2v_pipe) -> None:
    """The TI2V folder's cached condition is the image-to-video pipeline's; the adapter's inputs
    equal WanImageToVideoPipeline's (first frame clean, timestep 0 on its tokens) for an i2v
    sample and WanPipeline's (expand_timesteps: t on every token) for a t2v one; the loss skips
    the clean first frame of an i2v sample only."""
    encoder = _encoder(ti2v_dir)
    assert encoder.image_fields == {"video_latents": False, "condition_latents": False}
    clip = _clip(32, 64, seed=1)  # TI2V's sides are multiples of 32 (16x VAE, 2x2 patches)
    cached = encoder.encode_videos([clip])
    assert cached["condition_latents"].shape == (1, TI2V_LATENT_CHANNELS, 1, 2, 4)
    # The causal VAE encodes the first frame alone: the clip's first latent frame (mode) is it.
    assert torch.equal(cached["condition_latents"], cached["video_latents"][:, :, :1])
    for class_name, i2v in (("WanImageToVideoPipeline", True), ("WanPipeline", False)):
        pipe = ti2v_i2v_pipe if i2v else _pipe(ti2v_dir, class_name)
        extra = {"image": clip[0]} if i2v else {}
        call, text, output = _first_step(encoder, pipe, "a red circle", height=32, width=64, **extra)
        assert call["timestep"].shape == (1, 2 * 1 * 2)  # per token: 2 latent frames of 1 x 2
        noisy = call["hidden_states"].clone()
        noisy[:, :, 0] += 1.0 if i2v else 0.0  # what the pipeline replaces is not read
        t = pipe.scheduler.timesteps[0].expand(1).float()
        context = _context(noisy, cached["video_latents"], t, {**text, **cached}, torch.tensor([i2v]))
        inputs = WanAdapter().prepare_inputs(context)
        _assert_same_call(inputs, call, ("hidden_states", "timestep", "encoder_hidden_states"))
        assert torch.equal(WanAdapter().forward(pipe.transformer, inputs), output)
        assert WanAdapter().loss_mask(context).flatten().tolist() == [0.0 if i2v else 1.0, 1.0]


def test_pipeline_loss_leaves_out_what_the_adapter_masks() -> None:
    """FlowMatchingPipeline multiplies the adapter's loss mask into the batch's: a TI2V
    image-to-video sample's first latent frame does not count, whatever the model predicts
    there."""
    from flowtune.flow_matching import FlowMatchingPipeline

    class Frame0(torch.nn.Module):  # predicts 0 (the target is the noise), 1e3 on frame 0
        def forward(self, hidden_states, **_):
            out = torch.zeros_like(hidden_states)
            out[:, :, 0] = 1e3
            return (out,)

    flow = FlowMatchingPipeline(WanAdapter(), i2v_prob=1.0, use_loss_weighting=False)
    latents = torch.zeros(2, 4, 2, 2, 2)
    batch = {
        "video_latents": latents,
        "condition_latents": latents[:, :, :1],
        "text_embeddings": torch.zeros(2, 3, 8),
        "loss_mask": torch.tensor([1.0, 0.0]).view(2, 1, 1, 1),
    }
    noise = torch.zeros_like(latents)
    loss = flow.evaluate(Frame0(), batch, torch.tensor([0.5, 0.5]), noise, dtype=torch.float32)
    assert loss.tolist() == [5e5, 0.0]  # evaluate draws no i2v (t2v): frame 0 counts
    _, average, mask, _ = flow.step(
        Frame0(), batch, dtype=torch.float32, collect_metrics=False, check_loss=False
    )
    # i2v_prob 1: frame 0 masked; the batch's own mask drops the second sample.
    assert mask.flatten(1).tolist() == [[0.0, 1.0], [0.0, 0.0]]
    assert float(average) < 100  # the squared noise of frame 1 only


# ------------------------------------------------------------- training, validation, sampling

PROMPT, HEIGHT, WIDTH, GUIDANCE = "a blue square", 16, 32, 2.5


@pytest.fixture(scope="module")
def run(i2v_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-step image-to-video LoRA run on the tiny Wan 2.1 I2V (``flow.i2v_prob`` 0.5: the
    checkpoint conditions every sample on its first frame) with a validation clip started from
    ``validation.images``."""
    from rich.console import Console

    from flowtune.data.preprocess import preprocess
    from flowtune.data.synthetic import make_video_dataset
    from flowtune.recipe import load_recipe
    from flowtune.train.trainer import Trainer

    root = tmp_path_factory.mktemp("wan-i2v-run")
    make_video_dataset(root / "data", 2, seed=0, sizes=[(16, 16)], frames=FRAMES, fps=16)
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(root / "first.png")
    (root / "recipe.yaml").write_text(
        f"model: {{family: wan, pretrained: '{i2v_dir}', dtype: float32}}\n"
        "lora: {rank: 4, alpha: 8, init: gaussian}\n"
        f"data: {{source: '{root / 'data'}', cache_dir: '{root / 'cache'}', resolution: 16,"
        f" max_sequence_length: {TEXT_TOKENS}, frames: {FRAMES}}}\n"
        "flow: {i2v_prob: 0.5}\n"
        f"train: {{output_dir: '{root / 'out'}', max_steps: 1, seed: 0, mixed_precision: 'no', batch_size: 2}}\n"
        f"validation: {{prompts: ['{PROMPT}'], images: ['{root / 'first.png'}'], every: 0, seed: 5, steps: 1,"
        f" guidance: {GUIDANCE}, height: {HEIGHT}, width: {WIDTH}, frames: {FRAMES}}}\n"
        "optimizer: {lr: 5.0e-2}\n"
    )
    recipe = load_recipe(root / "recipe.yaml")
    preprocess(recipe, console=Console(quiet=True))
    Trainer(recipe, console=Console(quiet=True)).run()
    return root


def _strip_frames(path: Path) -> list[np.ndarray]:
    strip = np.asarray(Image.open(path))
    assert strip.shape == (HEIGHT, WIDTH * FRAMES, 3)
    return [strip[:, k * WIDTH : (k + 1) * WIDTH] for k in range(FRAMES)]


def test_i2v_run_caches_the_condition_and_its_clips_equal_the_pipeline_s_with_the_lora(
    i2v_pipe, run: Path, tmp_path: Path
) -> None:
    """The run cached each clip's condition latents and CLIP embeddings; its validation clip and
    `flowtune sample --image` with its LoRA equal WanImageToVideoPipeline's from that first frame
    with the LoRA loaded by diffusers, frame for frame (and differ without the LoRA)."""
    from flowtune.data.loader import CachedDataset
    from tests.helpers import cli

    item = CachedDataset(run / "cache")[0]
    assert item["condition_latents"].shape == item["video_latents"].shape == (16, 2, 2, 2)
    assert item["image_embeds"].shape == (5, CLIP_HIDDEN)
    out = tmp_path / "out"
    result = cli(
        "sample", "--ckpt", run / "out", "-p", PROMPT, "--image", run / "first.png", "--seed", "5", "--steps", "1",
        "--guidance", str(GUIDANCE), "--height", str(HEIGHT), "--width", str(WIDTH), "--frames", str(FRAMES),
        "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    pipe = i2v_pipe
    pipe.load_lora_weights(run / "out" / "final")
    video = pipe(
        image=Image.open(run / "first.png").convert("RGB"), prompt=PROMPT, negative_prompt="", num_frames=FRAMES,
        height=HEIGHT, width=WIDTH, num_inference_steps=1, guidance_scale=GUIDANCE, max_sequence_length=TEXT_TOKENS,
        generator=torch.Generator().manual_seed(5), output_type="np",
    ).frames[0]  # fmt: skip
    expected = [(frame * 255).round().astype("uint8") for frame in video]
    for folder in (out, run / "out" / "samples" / "step-000001"):
        assert (folder / "000000.mp4").is_file()
        got = _strip_frames(folder / "000000.png")
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True)), folder
    # The LoRA matters: the transformer predicts otherwise without it.
    inputs = {
        "hidden_states": torch.randn(1, I2V_IN_CHANNELS, 2, 2, 4), "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 4, 32), "encoder_hidden_states_image": torch.randn(1, 5, CLIP_HIDDEN),
    }  # fmt: skip
    with torch.no_grad():
        with_lora = pipe.transformer(**inputs)[0]
        pipe.disable_lora()
        assert not torch.allclose(pipe.transformer(**inputs)[0], with_lora)
    pipe.unload_lora_weights()


def test_each_checkpoint_loads_with_its_pipeline_class_and_granularity(i2v_dir: Path, ti2v_dir: Path) -> None:
    """A TI2V folder (saved as WanPipeline) samples first frames through WanImageToVideoPipeline
    and text alone through WanPipeline, its sides multiples of 32 (16x VAE, 2x2 patches); Wan
    2.1 I2V always through its own class, sides multiples of 16 (preprocess refuses a TI2V
    resolution that is not a multiple of 32)."""
    settings = EncoderSettings(dtype="float32", max_sequence_length=TEXT_TOKENS, latent_dist="mode")
    for model, first_frames, text_only, granularity in (
        (ti2v_dir, "WanImageToVideoPipeline", "WanPipeline", 32),
        (i2v_dir, "WanImageToVideoPipeline", "WanImageToVideoPipeline", 16),
    ):
        assert WanEncoder.pipeline_class_name(SPEC, model, first_frames=True) == first_frames
        assert WanEncoder.pipeline_class_name(SPEC, model) == text_only
        assert create_encoder(SPEC, model, settings).spatial_granularity() == granularity
    # Preprocess refuses a resolution the TI2V folder cannot take, in one line, before encoding.
    from types import SimpleNamespace

    from flowtune.data.preprocess import check_granularity
    from flowtune.errors import FlowtuneError

    def recipe(resolution: int) -> SimpleNamespace:
        data = SimpleNamespace(resolution=resolution, bucket_step=None)
        return SimpleNamespace(data=data, model=SimpleNamespace(pretrained=str(ti2v_dir)))

    check_granularity(recipe(64), create_encoder(SPEC, ti2v_dir, settings))
    with pytest.raises(FlowtuneError, match=r"data.resolution 48 is not a multiple of 32"):
        check_granularity(recipe(48), create_encoder(SPEC, ti2v_dir, settings))
    check_granularity(recipe(48), create_encoder(SPEC, i2v_dir, settings))
    pipe = load_pipeline(
        SPEC, ti2v_dir, dtype=torch.float32, device="cpu", without=["text_encoder"], first_frames=True
    )
    assert type(pipe).__name__ == "WanImageToVideoPipeline" and pipe.config.expand_timesteps


def test_the_plan_takes_each_checkpoint_s_side_granularity_from_its_vae_config() -> None:
    """A Hub id's bundled VAE config gives the plan TI2V-5B's 32 px sides (a 16 px multiple of a
    bucket was a shape its transformer refused, with a traceback) and 8x Wan 2.1's 16."""
    from flowtune.memory.phases import component_config
    from flowtune.memory.steps import recipe_bucket
    from flowtune.recipe import load_recipe

    ti2v = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    assert WanEncoder.granularity_for(SPEC, component_config(ti2v, "vae")) == 32
    assert WanEncoder.granularity_for(SPEC, component_config("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vae")) == 16
    assert WanEncoder.granularity_for(SPEC, None) == 16
    for resolution in (480, 640):
        recipe = load_recipe(
            "wan21-t2v-1.3b-lora", [f"model.pretrained={ti2v}", f"data.resolution={resolution}"]
        )
        assert all(side % 32 == 0 for side in recipe_bucket(recipe, SPEC))


def test_bundled_configs_build_at_the_published_sizes_and_example_batches_fit_them() -> None:
    """flowtune plan offline: the I2V 14B transformers (16.4B: the T2V 14B with CLIP image
    projections in every block), TI2V-5B's transformer, its own Wan 2.2 VAE (48 channels, 16x)
    and UMT5-XXL; example batches shaped as the encoder caches for them."""
    from flowtune.memory.plan import load_transformer_config
    from tests.helpers import bundled_billions

    i2v, ti2v = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    assert 16.3 < bundled_billions(i2v, "transformer", SPEC.transformer_class) < 16.5
    assert 4.9 < bundled_billions(ti2v, "transformer", SPEC.transformer_class) < 5.1
    assert 0.6 < bundled_billions(ti2v, "vae") < 0.8 and 5.6 < bundled_billions(ti2v, "text_encoder") < 5.8
    shapes = WanAdapter().example_shapes(load_transformer_config(i2v)[0], ExampleSize(1, 480, 832, 512, 81))
    assert shapes["condition_latents"] == shapes["video_latents"] == (1, 16, 21, 60, 104)
    assert shapes["image_embeds"] == (1, 257, 1280)
    shapes = WanAdapter().example_shapes(
        load_transformer_config(ti2v)[0], ExampleSize(1, 704, 1280, 512, 121)
    )
    assert shapes["video_latents"] == (1, 48, 31, 44, 80) and shapes["condition_latents"] == (
        1,
        48,
        1,
        44,
        80,
    )


def test_image_projections_export_under_the_names_diffusers_converts_back() -> None:
    """A LoRA that targets Wan 2.1 I2V's image key/value projections exports them under Wan's
    names (``cross_attn.k_img / v_img``), which diffusers' Wan converter maps back onto them."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    from flowtune.families.wan.naming import wan_slot

    state = {}
    for module in ("attn2.add_k_proj", "attn2.add_v_proj"):
        name = wan_slot(f"blocks.0.{module}").name
        state[f"diffusion_model.{name}.lora_down.weight"] = torch.ones(4, 8)
        state[f"diffusion_model.{name}.lora_up.weight"] = torch.ones(8, 4)
    converted = _convert_non_diffusers_wan_lora_to_diffusers(state)
    assert {key for key in converted if "add_" in key} == {
        f"transformer.blocks.0.attn2.{m}.lora_{ab}.weight"
        for m in ("add_k_proj", "add_v_proj")
        for ab in "AB"
    }


def test_ti2v_sample_image_equals_the_image_to_video_pipeline_s_clip(
    ti2v_dir: Path, ti2v_i2v_pipe, tmp_path: Path
) -> None:
    """`flowtune sample --image` on a TI2V folder (saved as WanPipeline) samples through
    WanImageToVideoPipeline: the clip equals its own from that first frame, frame for frame."""
    from tests.helpers import cli

    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(tmp_path / "first.png")
    result = cli(
        "sample", "--model", ti2v_dir, "-p", PROMPT, "--image", tmp_path / "first.png", "--seed", "5", "--steps", "1",
        "--guidance", "1", "--height", "32", "--width", "64", "--frames", "5", "--out", tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    video = ti2v_i2v_pipe(
        image=Image.open(tmp_path / "first.png").convert("RGB"), prompt=PROMPT, num_frames=5, height=32, width=64,
        num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).frames[0]  # fmt: skip
    expected = np.concatenate([(frame * 255).round().astype("uint8") for frame in video], axis=1)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "000000.png")), expected)
