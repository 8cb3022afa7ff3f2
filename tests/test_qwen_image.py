"""Qwen-Image (``qwen-image``): the tiny pipeline, the encoder's cached tensors equal to
QwenImagePipeline's own, the adapter's transformer inputs equal to the pipeline's at the same step,
the LoRA exports loading back through diffusers' Qwen-Image converter, and a LoRA that learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtune.encoders.base import EncoderSettings, create_encoder
from flowtune.families import get_family
from flowtune.families.qwen_image.adapter import QwenImageAdapter
from flowtune.families.qwen_image.encoder import normalize_latents
from flowtune.flow_matching import create_adapter
from flowtune.tiny import make_tiny
from tests.helpers import family_pipeline, image_context, learning_targets, transformer_calls

SPEC = get_family("qwen-image")
PROMPTS = ["a blue square", "a large green triangle on a yellow background in the sky", " "]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny("qwen-image", tmp_path_factory.mktemp("qwen") / "tiny-qwen-image")


@pytest.fixture(scope="module")
def pipe(model: Path):
    return family_pipeline("qwen-image", model)


def _encoder(model: Path, max_sequence_length: int = 64, latent_dist: str = "mode"):
    settings = EncoderSettings(
        dtype="float32", max_sequence_length=max_sequence_length, latent_dist=latent_dist
    )
    encoder = create_encoder(SPEC, model, settings, device="cpu")
    encoder.load(images=True, texts=True)
    return encoder


# ------------------------------------------------------------------------------ tiny pipeline


def test_tiny_tokenizer_spells_the_template_as_qwen_does(pipe) -> None:
    tokenizer = pipe.tokenizer
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    ids = tokenizer(template.format("a red square"))["input_ids"]
    # The 34 tokens the pipeline drops are exactly the template's text before the caption.
    assert tokenizer.decode(ids[:drop]) == template.split("{}")[0]
    assert tokenizer.decode(ids[drop:]) == "a red square" + template.split("{}")[1]
    assert [tokenizer.decode([i]) for i in ids[drop : drop + 3]] == ["a", " red", " square"]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    config = pipe.text_encoder.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_tiny_latents_are_normalised_to_unit_scale(model) -> None:
    from flowtune.data.synthetic import draw_shape, sample_specs

    encoder = _encoder(model)
    images = [draw_shape(spec, 64, 64) for spec in sample_specs(8, seed=3)]
    latents = encoder.encode_images(images)["image_latents"]
    assert latents.shape == (8, 16, 8, 8)
    assert abs(latents.mean().item()) < 0.3 and 0.6 < latents.std().item() < 1.5


# ---------------------------------------------------------------------------------- encoder


def test_cached_text_is_the_pipeline_s_encode_prompt_unpadded(pipe, model) -> None:
    encoder = _encoder(model, max_sequence_length=12)
    rows = encoder.encode_prompts(PROMPTS)["text_embeddings"]
    assert len(rows) == 3
    for prompt, row in zip(PROMPTS, rows, strict=True):
        expected, mask = pipe.encode_prompt(prompt, device="cpu", max_sequence_length=12)
        assert mask is None  # one prompt: no padding, the pipeline drops the all-ones mask
        assert torch.equal(row, expected[0])
    # the caption's tokens and the template's closing 5, truncated to max_sequence_length
    assert [row.shape for row in rows] == [(8, 32), (12, 32), (6, 32)]
    assert encoder.token_counts(PROMPTS) == [8, 16, 6]
    # in a padded batch the pipeline computes the same embeddings up to float rounding, masked
    batch, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=12)
    assert mask.sum(dim=1).tolist() == [8, 12, 6]
    for row, padded in zip(rows, batch, strict=True):
        torch.testing.assert_close(row, padded[: len(row)])


@pytest.mark.parametrize("latent_dist", ["mode", "sample"])
def test_cached_latents_are_the_pipeline_s_encoded_images(model, latent_dist) -> None:
    from diffusers import QwenImageImg2ImgPipeline

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(2)]
    encoder = _encoder(model, latent_dist=latent_dist)
    generators = [torch.Generator().manual_seed(k) for k in range(2)]
    got = encoder.encode_images(images, generators)["image_latents"]
    assert got.shape == (2, 16, 6, 8)

    img2img = QwenImageImg2ImgPipeline(**encoder.pipe.components)
    pixels = img2img.image_processor.preprocess(images)[:, :, None]  # one-frame videos
    dist = img2img.vae.encode(pixels).latent_dist
    if latent_dist == "sample":
        generators = [torch.Generator().manual_seed(k) for k in range(2)]
        z = dist.sample(generator=generators)
    else:
        z = dist.mode()
    assert torch.equal(got, normalize_latents(img2img.vae, z)[:, :, 0])
    # The pipelines' own encoding of their input images (a sample, image by image): the same
    # operations, equal up to the rounding that batching changes.
    generators = [torch.Generator().manual_seed(k) for k in range(2)]
    expected = img2img._encode_vae_image(pixels, generators)[:, :, 0]
    if latent_dist == "sample":
        torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------- adapter


def test_created_by_name_with_the_reference_defaults() -> None:
    adapter = create_adapter("qwen_image")
    assert isinstance(adapter, QwenImageAdapter)
    assert adapter.guidance_scale == 3.5 and adapter.use_guidance_embeds is False


def test_pack_and_unpack_equal_the_pipeline_s() -> None:
    from diffusers import QwenImagePipeline

    latents = torch.randn(2, 16, 6, 8)
    packed = QwenImageAdapter._pack_latents(latents)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(latents, 2, 16, 6, 8))
    unpacked = QwenImageAdapter._unpack_latents(packed, 48, 64)
    assert torch.equal(unpacked, latents)
    assert torch.equal(unpacked, QwenImagePipeline._unpack_latents(packed, 48, 64, 8)[:, :, 0])
    with pytest.raises(ValueError, match="cannot unpack 12 tokens into a 4x4 grid"):
        QwenImageAdapter._unpack_latents(packed, 64, 64)


def _pipeline_calls(
    pipe, prompts: list[str], height: int, width: int
) -> tuple[list[dict], list[torch.Tensor]]:
    """The transformer calls of QwenImagePipeline's first step with true CFG (its keyword inputs:
    the prompt's, then the negative prompt's) and their outputs."""
    calls, outputs = transformer_calls(
        pipe, prompt=prompts, negative_prompt=[" "] * len(prompts), true_cfg_scale=4.0, height=height,
        width=width, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
    )  # fmt: skip
    return calls[:2], outputs[:2]


@pytest.mark.parametrize(
    "prompts", [["a blue square"], ["a blue square", "a large green triangle on a yellow sky"]]
)
def test_inputs_and_prediction_equal_the_pipeline_s_at_the_same_step(pipe, prompts) -> None:
    height, width = 48, 64  # 3 x 4 tokens of 2 x 2 latent patches
    calls, outputs = _pipeline_calls(pipe, prompts, height, width)
    assert len(calls) == 2  # the prompt's pass and the negative prompt's
    t = pipe.scheduler.timesteps[0].expand(len(prompts))  # the first step's timestep (t = 1000 sigma)
    adapter = QwenImageAdapter()
    noisy = adapter._unpack_latents(calls[0]["hidden_states"], height, width)
    for call, output in zip(calls, outputs, strict=True):
        text, mask = call["encoder_hidden_states"], call["encoder_hidden_states_mask"]
        batch = {"text_embeddings": text}
        if mask is not None:  # as the loader collates unpadded cached embeddings: a mask only if padded
            batch["text_embeddings_mask"] = mask.bool()
        inputs = adapter.prepare_inputs(image_context(noisy, t / 1000, batch))
        if call is calls[0]:  # prompts of different lengths are padded and masked
            assert (mask is None) == (len(prompts) == 1)
        for key in ("hidden_states", "encoder_hidden_states", "timestep"):
            assert inputs[key].dtype == call[key].dtype, key
            assert torch.equal(inputs[key], call[key]), key
        if mask is None:
            assert inputs["encoder_hidden_states_mask"] is None
        else:
            assert torch.equal(inputs["encoder_hidden_states_mask"], mask.bool())
        assert inputs["img_shapes"] == call["img_shapes"] == [[(1, 3, 4)]] * len(prompts)
        assert inputs["guidance"] is None and call["guidance"] is None
        pred = adapter.forward(pipe.transformer, inputs)
        assert pred.shape == (len(prompts), 16, 6, 8)
        assert torch.equal(pred, adapter._unpack_latents(output, height, width))


def test_cfg_dropout_zeroes_only_the_dropped_samples_text() -> None:
    text = torch.randn(2, 6, 32)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    context = image_context(
        torch.randn(2, 16, 4, 4),
        torch.tensor([0.3, 0.6]),
        {"text_embeddings": text, "text_embeddings_mask": mask},
    )
    context.cfg_dropout_mask = torch.tensor([True, False])
    inputs = QwenImageAdapter().prepare_inputs(context)
    assert torch.equal(inputs["encoder_hidden_states"][0], torch.zeros(6, 32))
    assert torch.equal(inputs["encoder_hidden_states"][1], text[1])
    assert torch.equal(inputs["encoder_hidden_states_mask"], mask)  # the dropped sample keeps its mask
    context.cfg_dropout_mask, context.cfg_dropout_prob = None, 1.0  # called directly: the probability
    assert QwenImageAdapter().prepare_inputs(context)["encoder_hidden_states"].abs().sum() == 0


def test_unbatched_text_and_latents_of_the_wrong_rank() -> None:
    text = torch.randn(6, 32)  # [L, D] for a batch of one
    context = image_context(torch.randn(1, 16, 4, 4), torch.tensor([0.5]), {"text_embeddings": text})
    inputs = QwenImageAdapter().prepare_inputs(context)
    assert torch.equal(inputs["encoder_hidden_states"], text[None])
    assert inputs["encoder_hidden_states_mask"] is None and inputs["img_shapes"] == [[(1, 2, 2)]]
    context.noisy_latents = torch.randn(1, 16, 1, 4, 4)
    with pytest.raises(ValueError, match=r"QwenImageAdapter expects 4D latents \[B, C, H, W\], got 5D"):
        QwenImageAdapter().prepare_inputs(context)


def test_example_batch_runs_a_training_step(pipe) -> None:
    adapter = QwenImageAdapter()
    batch = adapter.example_batch(dict(pipe.transformer.config), 2, 32, 48, text_tokens=7)
    assert batch["image_latents"].shape == (2, 16, 4, 6) and batch["text_embeddings"].shape == (2, 7, 32)
    latents = batch["image_latents"]
    inputs = adapter.prepare_inputs(image_context(latents, torch.tensor([0.1, 0.9]), batch))
    assert adapter.forward(pipe.transformer, inputs).shape == latents.shape


# ------------------------------------------------------------------------------------ plan


@pytest.mark.parametrize(
    ("component", "billions"),
    [("transformer", (20.4, 20.5)), ("text_encoder", (8.2, 8.4)), ("vae", (0.12, 0.13))],
)
def test_bundled_configs_build_at_the_published_sizes(component, billions) -> None:
    """Qwen/Qwen-Image's bundled configs (flowtune plan offline): the 20B transformer,
    Qwen2.5-VL-7B (8.29B with its vision tower) and the VAE."""
    from tests.helpers import bundled_billions

    assert billions[0] < bundled_billions("Qwen/Qwen-Image", component, SPEC.transformer_class) < billions[1]


def test_plan_traces_the_video_vae_and_the_text_encoder_as_they_allocate(model) -> None:
    """On the tiny folder: the fake trace of each preprocess half equals what the same code
    allocates on real random weights; the VAE takes images as one-frame videos
    (FamilySpec.video_vae)."""
    from flowtune.memory.phases import _text_phase, _vae_phase
    from flowtune.recipe import load_recipe

    recipe = load_recipe("tiny-qwen-image-demo", [f"model.pretrained={model}"])
    assert SPEC.video_vae
    assert _text_phase(recipe, SPEC, 2) == _text_phase(recipe, SPEC, 2, fake=False)
    for decode in (False, True):
        assert _vae_phase(recipe, SPEC, 2, 64, 96, decode) == _vae_phase(
            recipe, SPEC, 2, 64, 96, decode, fake=False
        )


# ---------------------------------------------------------------------------- block offload


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_blocks_train_the_same_lora(model, checkpointing) -> None:
    """train.block_offload over Qwen-Image's one block list (FamilySpec.block_lists): 3 LoRA steps
    with none or one of the two blocks resident equal the steps without offload, every use of an
    offloaded weight while its block is on the device (strict)."""
    from tests.helpers import assert_offloaded_blocks_train_the_same_lora

    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(2, 6, 32, generator=g),
        "encoder_hidden_states_mask": torch.tensor([[True] * 6, [True] * 4 + [False] * 2]),
        "timestep": torch.tensor([0.3, 0.8]),
        "img_shapes": [[(1, 4, 4)]] * 2,
        "return_dict": False,
    }

    assert_offloaded_blocks_train_the_same_lora(SPEC, model, inputs, checkpointing=checkpointing)


# ---------------------------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_exported_files_load_through_diffusers_qwen_converter_with_the_same_images(
    pipe, fmt, tmp_path
) -> None:
    """A LoRA on every linear layer of the tiny transformer (scale 2, one module at rank 2),
    exported with Qwen-Image's names (``lora_unet_...`` / ``diffusion_model....``, lora_down/up,
    alpha): diffusers' Qwen-Image converter maps every module back, and QwenImagePipeline samples
    the same latents with it as with flowtune's own file."""
    from peft import LoraConfig
    from safetensors import safe_open

    from flowtune.families.qwen_image.tiny import tiny_qwen_transformer
    from flowtune.interop.lora import write_lora
    from flowtune.train.model import LORA_WEIGHTS_NAME, save_lora

    torch.manual_seed(0)
    transformer = tiny_qwen_transformer()
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    config = LoraConfig(
        target_modules=linears, r=4, lora_alpha=8, init_lora_weights=False,
        rank_pattern={"transformer_blocks.0.attn.to_k": 2}, alpha_pattern={"transformer_blocks.0.attn.to_k": 4},
    )  # fmt: skip
    transformer.add_adapter(config)
    save_lora(transformer, SPEC, tmp_path / "lora")
    out = tmp_path / f"{fmt}.safetensors"
    assert write_lora(tmp_path / "lora" / LORA_WEIGHTS_NAME, SPEC, fmt, out, None) == (len(linears),) * 2
    prefix = "lora_unet_" if fmt == "kohya" else "diffusion_model."
    with safe_open(str(out), "pt") as handle:
        keys = set(handle.keys())  # noqa: SIM118 - not a dict
    expected = linears[0].replace(".", "_") if fmt == "kohya" else linears[0]
    assert f"{prefix}{expected}.lora_down.weight" in keys and f"{prefix}{expected}.alpha" in keys
    assert len(keys) == 3 * len(linears)

    def latents() -> torch.Tensor:
        return pipe(
            prompt="a blue square", negative_prompt=" ", true_cfg_scale=4.0, height=32, width=32,
            num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
        ).images  # fmt: skip

    pipe.load_lora_weights(tmp_path / "lora")
    try:
        assert set(pipe.get_list_adapters()["transformer"]) == {"default_0"}
        own = latents()
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(out))
        converted = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")}
        assert converted == set(linears)
        assert torch.equal(latents(), own)
    finally:
        pipe.unload_lora_weights()


# ------------------------------------------------------------------------------- learning

LEARNING_SEED, LEARNING_STEPS = 13, 200


@pytest.mark.slow
def test_lora_training_makes_each_caption_sample_its_own_image(tmp_path: Path) -> None:
    from diffusers import QwenImagePipeline

    from flowtune.data.synthetic import make_shapes_dataset
    from tests.helpers import (
        LEARNING_SEQUENCE_LENGTH,
        QWEN_IMAGE_PROJ_OUT_TOO,
        nearest_targets,
        train_learning_run,
    )

    model = make_tiny("qwen-image", tmp_path / "tiny-qwen-image")
    make_shapes_dataset(tmp_path / "data", 4, seed=LEARNING_SEED)
    _, data = train_learning_run(
        tmp_path, model, "qwen-image", tmp_path / "data", LEARNING_STEPS, lora_extra=QWEN_IMAGE_PROJ_OUT_TOO
    )
    targets, captions = learning_targets(data)

    def sample(pipe: QwenImagePipeline, i: int) -> torch.Tensor:
        packed = pipe(
            prompt=captions[i],
            true_cfg_scale=1.0,  # trained always conditioned: no negative prompt
            height=64,
            width=64,
            num_inference_steps=20,
            max_sequence_length=LEARNING_SEQUENCE_LENGTH,
            generator=torch.Generator().manual_seed(0),  # the same starting noise for every caption
            output_type="latent",
        ).images  # [1, 16, 64]: the packed 4 x 4 grid of 2 x 2 patches of normalised latents
        return QwenImagePipeline._unpack_latents(packed, 64, 64, pipe.vae_scale_factor)[:, :, 0].flatten(1)

    nearest = nearest_targets(QwenImagePipeline, model, tmp_path / "run" / "final", targets, sample)
    assert nearest == [0, 1, 2, 3], f"captions {captions} sampled nearest to images {nearest}"
