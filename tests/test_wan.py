"""Wan 2.1 T2V (``wan``): the tiny pipeline, the encoder's cached tensors equal to WanPipeline's
own, the adapter's transformer inputs equal to the pipeline's at the same step, sampling (frames
equal to the pipeline's with the LoRA, an MP4 and a frame strip), the LoRA exports loading back
through diffusers' Wan converters, and the bundled configs of ``flowtune plan``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtune.encoders.base import EncoderSettings, create_encoder
from flowtune.families import get_family
from flowtune.families.qwen_image.encoder import normalize_latents
from flowtune.families.wan.adapter import WanAdapter
from flowtune.families.wan.encoder import WanEncoder
from flowtune.flow_matching import FlowMatchingContext, create_adapter
from flowtune.tiny import make_tiny
from tests.helpers import family_pipeline, transformer_calls

SPEC = get_family("wan")
PROMPTS = ["a blue square", "a large green triangle on a yellow background in the sky", ""]
TEXT_TOKENS = 10


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny("wan", tmp_path_factory.mktemp("wan") / "tiny-wan")


@pytest.fixture(scope="module")
def pipe(model: Path):
    return family_pipeline("wan", model)


def _encoder(model: Path, max_sequence_length: int = TEXT_TOKENS, latent_dist: str = "mode") -> WanEncoder:
    settings = EncoderSettings(
        dtype="float32", max_sequence_length=max_sequence_length, latent_dist=latent_dist
    )
    encoder = create_encoder(SPEC, model, settings, device="cpu")
    encoder.load(images=True, texts=True)
    return encoder


def _clips(
    count: int, frames: int, height: int = 32, width: int = 48, seed: int = 0
) -> list[list[Image.Image]]:
    rng = np.random.default_rng(seed)
    return [
        [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(frames)]
        for _ in range(count)
    ]


def _context(noisy: torch.Tensor, t: torch.Tensor, batch: dict) -> FlowMatchingContext:
    return FlowMatchingContext(
        noisy_latents=noisy, latents=noisy, timesteps=t, sigma=t / 1000, task_type="t2v", data_type="video",
        device=torch.device("cpu"), dtype=torch.float32, batch=batch,
    )  # fmt: skip


# ------------------------------------------------------------------------------ tiny pipeline


def test_tiny_builder_loads_as_a_wan_pipeline(pipe) -> None:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    assert isinstance(pipe.transformer, WanTransformer3DModel) and isinstance(pipe.vae, AutoencoderKLWan)
    config = pipe.transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    assert width >= config.in_channels * int(np.prod(config.patch_size))  # a latent token's features
    assert pipe.tokenizer("a blue square").input_ids[-1] == pipe.tokenizer.eos_token_id == 1
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 8)


# ---------------------------------------------------------------------------------- encoder


@torch.no_grad()  # as WanPipeline.__call__ runs encode_prompt (SDPA's kernels differ with grad)
def test_cached_text_is_the_pipeline_s_encode_prompt_unpadded(pipe, model) -> None:
    encoder = _encoder(model)
    text = encoder.encode_prompts(PROMPTS)
    rows, lengths = text["text_embeddings"], text["text_length"]
    assert lengths.shape == (3, TEXT_TOKENS, 0)
    assert [row.shape[0] for row in rows] == [4, TEXT_TOKENS, 1]  # tokens and </s>, truncated
    assert encoder.token_counts(PROMPTS) == [4, 12, 1]
    for i, (prompt, row) in enumerate(zip(PROMPTS, rows, strict=True)):
        expected, _ = pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS, device="cpu"
        )
        assert expected.shape == (1, TEXT_TOKENS, 32)
        assert torch.equal(row, expected[0, : len(row)])
        assert not expected[0, len(row) :].any()  # the pipeline's padding is zeros
        # rebuilt as the pipeline pads, tensor for tensor (validation's prompt_embeds)
        cached = {"text_embeddings": row[None], "text_length": lengths[i : i + 1]}
        assert torch.equal(WanEncoder.prompt_inputs(cached)["prompt_embeds"], expected)
    # the empty negative prompt the pipeline encodes by default ("" when none is given)
    _, negative = pipe.encode_prompt("a blue square", max_sequence_length=TEXT_TOKENS, device="cpu")
    cached = {"text_embeddings": rows[2][None], "text_length": lengths[2:]}
    assert torch.equal(WanEncoder.negative_inputs(cached)["negative_prompt_embeds"], negative)


@pytest.mark.parametrize("latent_dist", ["mode", "sample"])
@torch.no_grad()
def test_cached_latents_are_the_pipeline_s_encoded_videos(model, latent_dist) -> None:
    clips = _clips(2, 5, height=16, width=32)
    encoder = _encoder(model, latent_dist=latent_dist)
    got = encoder.encode_videos(clips, [torch.Generator().manual_seed(k) for k in range(2)])["video_latents"]
    assert got.shape == (2, 16, 2, 2, 4)  # 5 frames -> 1 + 4/4 latent frames

    # WanVideoToVideoPipeline.prepare_latents' encoding: clip by clip, retrieve_latents
    # ("argmax": the mode), then (z - latents_mean) * (1 / latents_std) in float32
    from diffusers.pipelines.wan.pipeline_wan_video2video import retrieve_latents

    vae = encoder.pipe.vae
    video = encoder.pipe.video_processor.preprocess_video(clips, height=16, width=32)
    generators = [torch.Generator().manual_seed(k) for k in range(2)]
    mode = "sample" if latent_dist == "sample" else "argmax"
    z = torch.cat(
        [retrieve_latents(vae.encode(v[None]), g, mode) for v, g in zip(video, generators, strict=True)]
    )
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.equal(got, (z.float() - mean) * inverse_std)
    assert torch.equal(got, normalize_latents(vae, z))


def test_images_are_one_frame_clips(model) -> None:
    encoder = _encoder(model)
    images = [clip[0] for clip in _clips(2, 1, seed=4)]
    got = encoder.encode_images(images)["video_latents"]
    assert got.shape == (2, 16, 1, 4, 6)
    assert torch.equal(got, encoder.encode_videos([[image] for image in images])["video_latents"])


# ---------------------------------------------------------------------------------- adapter


def test_created_by_name() -> None:
    assert isinstance(create_adapter("wan"), WanAdapter)


@pytest.mark.parametrize(
    "prompts", [["a blue square"], ["a blue square", "a large green triangle in the sky"]]
)
def test_inputs_and_prediction_equal_the_pipeline_s_at_the_same_step(pipe, model, prompts) -> None:
    """WanPipeline's first step with classifier-free guidance (the prompt's pass, then the empty
    negative prompt's) against the adapter's inputs from the cached, unpadded embeddings."""
    calls, outputs = transformer_calls(
        pipe, prompt=prompts, num_frames=5, height=32, width=48, num_inference_steps=2, guidance_scale=5.0,
        max_sequence_length=TEXT_TOKENS, generator=torch.Generator().manual_seed(0), output_type="latent",
    )  # fmt: skip
    calls, outputs = calls[:2], outputs[:2]
    encoder = _encoder(model)
    t = pipe.scheduler.timesteps[0].expand(len(prompts)).float()
    for call, output, texts in zip(calls, outputs, [prompts, [""] * len(prompts)], strict=True):
        cached = encoder.encode_prompts(texts)
        rows = cached["text_embeddings"]
        batch = {"text_embeddings": torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)}
        batch["text_length"] = cached["text_length"]
        inputs = WanAdapter().prepare_inputs(_context(call["hidden_states"], t, batch))
        assert inputs["hidden_states"].shape == (len(prompts), 16, 2, 4, 6)
        for key in ("hidden_states", "encoder_hidden_states"):
            assert inputs[key].dtype == call[key].dtype, key
            assert torch.equal(inputs[key], call[key]), key
        # The UniPC scheduler's timesteps are integers; flowtune's are continuous (float32), and
        # the transformer embeds both as float32.
        assert call["timestep"].dtype == torch.int64 and inputs["timestep"].dtype == torch.float32
        assert torch.equal(inputs["timestep"], call["timestep"].float())
        pred = WanAdapter().forward(pipe.transformer, inputs)
        assert torch.equal(pred, output)


def test_cfg_dropout_zeroes_only_the_dropped_samples_text() -> None:
    text = torch.randn(2, 6, 32)
    context = _context(torch.randn(2, 16, 1, 4, 4), torch.tensor([300.0, 600.0]),
                       {"text_embeddings": text, "text_length": torch.zeros(2, 8, 0)})  # fmt: skip
    context.cfg_dropout_mask = torch.tensor([True, False])
    inputs = WanAdapter().prepare_inputs(context)
    assert inputs["encoder_hidden_states"].shape == (2, 8, 32)
    assert not inputs["encoder_hidden_states"][0].any()
    assert torch.equal(inputs["encoder_hidden_states"][1, :6], text[1])
    context.noisy_latents = torch.randn(2, 16, 4, 4)
    with pytest.raises(ValueError, match=r"WanAdapter expects 5D video latents"):
        WanAdapter().prepare_inputs(context)


def test_example_batch_runs_a_training_step(pipe) -> None:
    adapter = WanAdapter()
    batch = adapter.example_batch(dict(pipe.transformer.config), 2, 32, 48, text_tokens=7, frames=9)
    assert batch["video_latents"].shape == (2, 16, 3, 4, 6) and batch["text_embeddings"].shape == (2, 7, 32)
    latents = batch["video_latents"]
    inputs = adapter.prepare_inputs(_context(latents, torch.tensor([100.0, 900.0]), batch))
    assert adapter.forward(pipe.transformer, inputs).shape == latents.shape


# --------------------------------------------------------------------------------- sampling

FRAMES, HEIGHT, WIDTH, GUIDANCE = 5, 32, 48, 2.5
PROMPT = "a blue square"


@pytest.fixture(scope="module")
def run(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step LoRA run on 5-frame clips (2 latent frames; `make-dataset --video` clips through
    the video data path) with a held-out loss and a 5-frame validation clip."""
    from rich.console import Console

    from flowtune.data.preprocess import preprocess
    from flowtune.data.synthetic import make_video_dataset
    from flowtune.recipe import load_recipe
    from flowtune.train.trainer import Trainer

    root = tmp_path_factory.mktemp("wan-run")
    make_video_dataset(root / "data", 4, seed=0, sizes=[(32, 32)], frames=FRAMES, fps=16)
    (root / "recipe.yaml").write_text(
        f"model: {{family: wan, pretrained: '{model}', dtype: float32}}\n"
        "lora: {rank: 4, alpha: 8, init: gaussian}\n"
        f"data: {{source: '{root / 'data'}', cache_dir: '{root / 'cache'}', resolution: 32,"
        f" max_sequence_length: {TEXT_TOKENS}, validation_split: 0.25, frames: {FRAMES}}}\n"
        f"train: {{output_dir: '{root / 'out'}', max_steps: 2, seed: 0, mixed_precision: 'no', batch_size: 2,"
        " log_every: 1}\n"
        f"validation: {{prompts: ['{PROMPT}'], every: 0, seed: 5, steps: 2, guidance: {GUIDANCE},"
        f" height: {HEIGHT}, width: {WIDTH}, frames: {FRAMES}}}\n"
        "optimizer: {lr: 5.0e-2}\n"
        "logging: {trackers: [tensorboard]}\n"
    )
    recipe = load_recipe(root / "recipe.yaml")
    preprocess(recipe, console=Console(quiet=True))
    Trainer(recipe, console=Console(quiet=True)).run()
    return root


def test_trains_on_clips_of_several_frames(run) -> None:
    from flowtune.data.loader import CachedDataset
    from flowtune.train.metrics import read_metrics

    item = CachedDataset(run / "cache")[0]
    assert item["video_latents"].shape == (16, 2, 4, 4) and item["text_length"].shape == (TEXT_TOKENS, 0)
    records = read_metrics(run / "out" / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert [np.isfinite(r["val_loss"]) for r in records if "val_loss" in r] == [True]


def test_validation_clips_play_in_tensorboard(run) -> None:
    """The validation clip reaches TensorBoard as an animated GIF of its frames at Wan's 16 fps
    (as SummaryWriter.add_video writes a clip), beside the frame strips in `validation`."""
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(next((run / "out" / "tensorboard").rglob("events.out.tfevents.*")).parent),
        size_guidance={"images": 0},
    )
    events.Reload()
    (clip,) = events.Images("validation_clips/0")
    (strip,) = events.Images("validation")
    assert (clip.step, clip.width, clip.height) == (2, WIDTH, HEIGHT) and strip.width == WIDTH * FRAMES
    gif = Image.open(io.BytesIO(clip.encoded_image_string))
    assert (
        gif.format == "GIF" and gif.n_frames == FRAMES and abs(gif.info["duration"] - 1000 / 16) < 10
    )  # GIF: 10 ms units


def _pipeline_frames(model: Path, lora: Path | None) -> list[np.ndarray]:
    """The plain WanPipeline's frames (output_type "np", as uint8 the way diffusers' numpy_to_pil
    rounds them) for the prompt, with the LoRA loaded."""
    pipe = family_pipeline("wan", model)
    if lora is not None:
        pipe.load_lora_weights(lora)
    video = pipe(
        prompt=PROMPT, negative_prompt="", num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=2,
        guidance_scale=GUIDANCE, max_sequence_length=TEXT_TOKENS, generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).frames[0]  # fmt: skip
    return [(frame * 255).round().astype("uint8") for frame in video]


def _strip_frames(path: Path) -> list[np.ndarray]:
    strip = np.asarray(Image.open(path))
    assert strip.shape == (HEIGHT, WIDTH * FRAMES, 3)
    return [strip[:, k * WIDTH : (k + 1) * WIDTH] for k in range(FRAMES)]


def _mp4_frames(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == SPEC.fps and stream.codec_context.name == "h264"
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]


def test_sample_and_validation_clips_equal_the_pipeline_s_frames_with_the_lora(model, run, tmp_path) -> None:
    from tests.helpers import cli

    out = tmp_path / "out"
    run = run / "out"
    result = cli(
        "sample", "--ckpt", run, "-p", PROMPT, "--seed", "5", "--steps", "2", "--guidance", str(GUIDANCE),
        "--height", str(HEIGHT), "--width", str(WIDTH), "--frames", str(FRAMES), "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = _pipeline_frames(model, run / "final")
    for folder in (out, run / "samples" / "step-000002"):
        strip = Image.open(folder / "000000.png")
        assert strip.text["prompt"] == PROMPT and strip.text["video"] == "000000.mp4"
        assert (strip.text["frames"], strip.text["fps"], strip.text["family"]) == (str(FRAMES), "16", "wan")
        got = _strip_frames(folder / "000000.png")
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
        decoded = _mp4_frames(folder / "000000.mp4")  # H.264 is lossy: near the frames
        assert len(decoded) == FRAMES
        assert all(np.abs(a.astype(int) - b).mean() < 8 for a, b in zip(decoded, expected, strict=True))
    without = _pipeline_frames(model, None)
    assert not all(np.array_equal(a, b) for a, b in zip(without, expected, strict=True))  # the LoRA matters


def test_frames_are_checked_against_the_family(model) -> None:
    from flowtune.errors import FlowtuneError
    from flowtune.sample import SampleSettings

    with pytest.raises(FlowtuneError, match=r"frames 6: must be 4 \* n \+ 1 frames"):
        SampleSettings(frames=6, height=32, width=32).check(SPEC)
    with pytest.raises(FlowtuneError, match="flux samples images; leave out --frames"):
        SampleSettings(frames=5, height=32, width=32).check(get_family("flux"))
    SampleSettings(frames=9, fps=24, height=32, width=32).check(SPEC)
    from flowtune.recipe import load_recipe

    with pytest.raises(FlowtuneError, match=r"validation.frames.*4 \* n \+ 1 frames"):
        load_recipe("tiny-wan-demo", ["validation.frames=6"])
    with pytest.raises(FlowtuneError, match=r"validation.frames.*samples images"):
        load_recipe("tiny-flux-demo", ["validation.frames=5"])


# ---------------------------------------------------------------------------- block offload


def test_offloaded_blocks_train_the_same_lora(model) -> None:
    """train.block_offload over Wan's one block list (FamilySpec.block_lists), with gradient
    checkpointing: 3 LoRA steps on clip latents with none or one of the two blocks resident equal
    the steps without offload, every use of an offloaded weight while its block is on the device
    (strict)."""
    from tests.helpers import assert_offloaded_blocks_train_the_same_lora

    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 16, 2, 4, 4, generator=g),
        "encoder_hidden_states": torch.randn(2, 6, 32, generator=g),
        "timestep": torch.tensor([300.0, 800.0]),
        "return_dict": False,
    }

    assert_offloaded_blocks_train_the_same_lora(SPEC, model, inputs, checkpointing=True)


# ---------------------------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_exported_files_load_through_diffusers_wan_converters_with_the_same_latents(
    pipe, fmt, tmp_path
) -> None:
    """A LoRA on the default targets (scale 2, one module at rank 2 and scale 2 too), exported with
    Wan's original names (``lora_unet_blocks_0_self_attn_q`` / ``diffusion_model.blocks.0.self_attn.q``,
    lora_down/up, alpha): diffusers' Wan converters (musubi-tuner's and ComfyUI's layout) map every
    module back, and WanPipeline samples the same latents with it as with flowtune's own file."""
    from peft import LoraConfig
    from safetensors import safe_open

    from flowtune.families.wan.tiny import tiny_wan_transformer
    from flowtune.interop.lora import write_lora
    from flowtune.train.model import LORA_WEIGHTS_NAME, expand_target_modules, save_lora

    torch.manual_seed(0)
    transformer = tiny_wan_transformer()
    targets = expand_target_modules(transformer, list(SPEC.lora_target_modules))
    config = LoraConfig(
        target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False,
        rank_pattern={"blocks.0.attn2.to_k": 2}, alpha_pattern={"blocks.0.attn2.to_k": 4},
    )  # fmt: skip
    transformer.add_adapter(config)
    save_lora(transformer, SPEC, tmp_path / "lora")
    modules = {n for n, m in transformer.named_modules() if hasattr(m, "lora_A")}
    assert len(modules) == 2 * 10  # 2 blocks x (self-attention 4, cross-attention 4, feed-forward 2)
    out = tmp_path / f"{fmt}.safetensors"
    assert write_lora(tmp_path / "lora" / LORA_WEIGHTS_NAME, SPEC, fmt, out, None) == (len(modules),) * 2
    with safe_open(str(out), "pt") as handle:
        keys = set(handle.keys())  # noqa: SIM118 - not a dict
    base = "lora_unet_blocks_0_cross_attn_k" if fmt == "kohya" else "diffusion_model.blocks.0.cross_attn.k"
    assert {f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"} <= keys
    assert len(keys) == 3 * len(modules)

    def latents() -> torch.Tensor:
        return pipe(
            prompt=PROMPT, num_frames=5, height=32, width=32, num_inference_steps=2, guidance_scale=GUIDANCE,
            max_sequence_length=TEXT_TOKENS, generator=torch.Generator().manual_seed(0), output_type="latent",
        ).frames  # fmt: skip

    pipe.load_lora_weights(tmp_path / "lora")
    try:
        own = latents()
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(out))
        assert {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")} == modules
        assert torch.equal(latents(), own)
    finally:
        pipe.unload_lora_weights()


# ------------------------------------------------------------------------------------ plan


@pytest.mark.parametrize(
    ("hub", "component", "billions"),
    [
        ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "transformer", (1.40, 1.45)),
        ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "transformer", (14.2, 14.4)),
        ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "text_encoder", (5.6, 5.8)),
        ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "vae", (0.12, 0.13)),
    ],
)
def test_bundled_configs_build_at_the_published_sizes(hub, component, billions) -> None:
    """Wan 2.1 T2V's bundled configs (flowtune plan offline): the 1.3B and 14B transformers, and
    the UMT5-XXL encoder and VAE that both ship (the 14B's found through component_sources)."""
    from tests.helpers import bundled_billions

    assert billions[0] < bundled_billions(hub, component, SPEC.transformer_class) < billions[1]


def test_plan_traces_clips_and_the_video_vae_as_they_allocate(model) -> None:
    """On the tiny folder: a video training step and the validation clip's denoising forward
    trace on fake tensors, and the fake trace of the VAE phases at a clip's frames equals what
    the same code allocates on real random weights."""
    from flowtune.memory.phases import _vae_phase
    from flowtune.memory.plan import trace_recipe
    from flowtune.memory.steps import validation_frames
    from flowtune.recipe import load_recipe

    recipe = load_recipe("tiny-wan-demo", [f"model.pretrained={model}"])
    assert validation_frames(recipe, SPEC) == 9
    assert validation_frames(load_recipe("tiny-wan-demo", ["validation.frames=null"]), SPEC) == 81
    assert trace_recipe(recipe, SPEC).sampling_peak > 0
    for decode, frames in ((False, 1), (True, 5)):
        fake = _vae_phase(recipe, SPEC, 1, 16, 32, decode, frames=frames)
        assert fake == _vae_phase(recipe, SPEC, 1, 16, 32, decode, fake=False, frames=frames)


# ------------------------------------------------------------------------------- learning

# As Qwen-Image's tiny model (tests/test_qwen_image.py), the tiny transformer's output layer
# (proj_out) is one random 64 x 64 matrix after a layer norm: the learning run adapts it too.
# Wan pads every caption to max_sequence_length with zero vectors that the transformer attends to
# (23 of the 32 text positions here), so the captions' differences reach the image more faintly
# than in the other families and the run takes more steps.  On still images (one-frame clips),
# 400 steps of batch 16 on data seeds 5, 7, 11 and 13 left each caption's sample nearer its own
# target than any other by a margin of at least 1.01.  On 5-frame clips (this test) 400 steps pass
# seeds 11 and 13; on seeds 5 and 7 two clips share their background colour and differ only in a
# small shape, and one of them lands on the other's clip (a higher rate, 3e-2, failed all four).
LEARNING_TARGETS = (
    ", target_modules: [attn1.to_q, attn1.to_k, attn1.to_v, attn1.to_out.0, attn2.to_q, attn2.to_k,"
    " attn2.to_v, attn2.to_out.0, ffn.net.0.proj, ffn.net.2, proj_out]"
)
LEARNING_SEED, LEARNING_STEPS, LEARNING_FRAMES = 11, 400, 5


@pytest.mark.slow
def test_lora_training_makes_each_caption_sample_its_own_clip(tmp_path: Path) -> None:
    """Four 5-frame clips of a shape moving (`make-dataset --video`): with the trained LoRA, each
    caption's 5-frame sample (2 latent frames) lands nearest its own clip's latents."""
    from diffusers import WanPipeline

    from flowtune.data.synthetic import make_video_dataset
    from tests.helpers import LEARNING_SEQUENCE_LENGTH, learning_targets, nearest_targets, train_learning_run

    model = make_tiny("wan", tmp_path / "tiny-wan")
    make_video_dataset(tmp_path / "data", 4, seed=LEARNING_SEED, frames=LEARNING_FRAMES)
    _, data = train_learning_run(
        tmp_path, model, "wan", tmp_path / "data", LEARNING_STEPS,
        data_extra=f", frames: {LEARNING_FRAMES}", lora_extra=LEARNING_TARGETS,
    )  # fmt: skip
    targets, captions = learning_targets(data, "video_latents")

    def sample(pipe: WanPipeline, i: int) -> torch.Tensor:
        return pipe(
            prompt=captions[i],
            guidance_scale=1.0,  # trained always conditioned: no classifier-free guidance
            num_frames=LEARNING_FRAMES,
            height=64,
            width=64,
            num_inference_steps=20,
            max_sequence_length=LEARNING_SEQUENCE_LENGTH,
            generator=torch.Generator().manual_seed(0),  # the same starting noise for every caption
            output_type="latent",
        ).frames.flatten(1)  # [1, 16, 2, 8, 8]: normalised latents of the clip

    nearest = nearest_targets(WanPipeline, model, tmp_path / "run" / "final", targets, sample)
    assert nearest == [0, 1, 2, 3], f"captions {captions} sampled nearest to images {nearest}"
