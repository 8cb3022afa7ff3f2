"""HunyuanVideo 1.5 (``hunyuan-video``): the tiny pipelines, the encoder's cached tensors equal to
the pipelines' own, and the adapter's transformer inputs equal to HunyuanVideo15Pipeline's
(text-to-video) and HunyuanVideo15ImageToVideoPipeline's (image-to-video) at the same step.

The family is not registered yet (its sampling needs the shared video sampling): the package is
used directly."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtune.data.loader import CacheCollator
from flowtune.encoders.base import EncoderSettings
from flowtune.families.hunyuan_video import SPEC
from flowtune.families.hunyuan_video.adapter import IMAGE_TOKENS, HunyuanVideoAdapter
from flowtune.families.hunyuan_video.encoder import PROMPT_TEMPLATE_START, HunyuanVideoEncoder, valid_rows
from flowtune.families.hunyuan_video.tiny import (
    LATENT_CHANNELS,
    build_tiny_hunyuan_video,
    build_tiny_hunyuan_video_i2v,
    system_message,
)
from flowtune.flow_matching import FlowMatchingContext
from tests.helpers import transformer_calls

C = LATENT_CHANNELS
PROMPTS = ['a sign that says "hello" in the sky', "a red square", ""]


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hunyuan") / "t2v"
    build_tiny_hunyuan_video(out)
    return out


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hunyuan") / "i2v"
    build_tiny_hunyuan_video_i2v(out)
    return out


def _pipe(cls_name: str, model: Path):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Qwen2.5-VL tokens per caption: the pipelines' 1000 (tokenizer_max_length) cut down to keep the
# tiny text encoder fast; the encoder sets its pipeline's the same way (data.max_sequence_length).
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def pipe(t2v_dir: Path):
    pipe = _pipe("HunyuanVideo15Pipeline", t2v_dir)
    assert pipe.tokenizer_max_length == 1000
    pipe.tokenizer_max_length = MAX_TOKENS
    return pipe


@pytest.fixture(scope="module")
def i2v_pipe(i2v_dir: Path):
    pipe = _pipe("HunyuanVideo15ImageToVideoPipeline", i2v_dir)
    pipe.tokenizer_max_length = MAX_TOKENS
    return pipe


@pytest.fixture(scope="module")
def encoder(t2v_dir: Path) -> HunyuanVideoEncoder:
    return _encoder(t2v_dir)


@pytest.fixture(scope="module")
def rows(encoder: HunyuanVideoEncoder) -> dict[str, list[torch.Tensor]]:
    return encoder.encode_prompts(PROMPTS)


def _encoder(
    model: Path, latent_dist: str = "mode", max_sequence_length: int = MAX_TOKENS
) -> HunyuanVideoEncoder:
    settings = EncoderSettings(
        dtype="float32", max_sequence_length=max_sequence_length, latent_dist=latent_dist
    )
    encoder = HunyuanVideoEncoder(SPEC, model, settings, device="cpu")
    encoder.load(images=True, texts=True)
    return encoder


def _clip(frames: int, height: int, width: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(frames)]


def _context(noisy, latents, t, batch, *, i2v=None) -> FlowMatchingContext:
    return FlowMatchingContext(
        noisy_latents=noisy, latents=latents, timesteps=t, sigma=t / 1000,
        task_type="i2v" if i2v is not None and bool(i2v.any()) else "t2v", data_type="video",
        device=torch.device("cpu"), dtype=torch.float32, batch=batch, i2v_mask=i2v,
    )  # fmt: skip


def _adapter_call(adapter: HunyuanVideoAdapter, model, inputs: dict) -> tuple[dict, torch.Tensor]:
    """The keyword inputs the transformer receives from ``adapter.forward`` and its prediction."""
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        pred = adapter.forward(model, inputs)
    finally:
        hook.remove()
    return calls[0], pred


def _assert_same_call(ours: dict, theirs: dict) -> None:
    for key in (
        "hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask",
        "encoder_hidden_states_2", "encoder_attention_mask_2", "image_embeds",
    ):  # fmt: skip
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key]), key
    assert ours.get("timestep_r") is None and theirs.get("timestep_r") is None


# ------------------------------------------------------------------------------ tiny pipeline


def test_tiny_loads_with_the_pipeline(pipe) -> None:
    config = pipe.transformer.config
    assert config.in_channels == 2 * C + 1 and config.out_channels == C
    inner = config.num_attention_heads * config.attention_head_dim
    assert inner >= config.in_channels  # a token's features fit the width
    assert pipe.vae_scale_factor_spatial == 16 and pipe.vae_scale_factor_temporal == 4
    # The 108 tokens the pipeline crops are exactly the chat template's before the user's text.
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

    ids = pipe.tokenizer.apply_chat_template(
        format_text_input(["a red square"], system_message()), add_generation_prompt=True, tokenize=True,
        return_dict=True,
    )["input_ids"][0]  # fmt: skip
    assert pipe.prompt_template_encode_start_idx == PROMPT_TEMPLATE_START
    assert pipe.tokenizer.decode(ids[PROMPT_TEMPLATE_START : PROMPT_TEMPLATE_START + 3]) == "a red square"


# ---------------------------------------------------------------------------------- encoder


def test_cached_text_is_the_pipeline_s_encode_prompt_at_its_valid_positions(pipe, encoder, rows) -> None:
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():  # as the pipeline calls it (T5 rounds differently with autograd)
            text, mask, text_2, mask_2 = pipe.encode_prompt(prompt, device="cpu")
        assert text.shape[1] == MAX_TOKENS and text_2.shape[1] == 256  # the pipeline's padded lengths
        assert torch.equal(rows["text_embeddings"][i], valid_rows(text, mask)[0])
        assert torch.equal(rows["text_embeddings_2"][i], valid_rows(text_2, mask_2)[0])
    # ByT5 reads the quoted text only ('Text "hello". ' + </s>); no quotes: no glyph tokens.
    assert [len(r) for r in rows["text_embeddings_2"]] == [len('Text "hello". ') + 1, 0, 0]
    counts = encoder.token_counts(PROMPTS)
    assert [len(r) for r in rows["text_embeddings"]] == [n for n in counts]
    assert counts[1] == 3 + 5  # "a red square" and the closing <|im_end|>\n<|im_start|>assistant\n
    # The empty prompt is the pipeline's negative prompt when given none.
    with torch.no_grad():
        negative = pipe.encode_prompt(None, device="cpu", batch_size=1)
    assert torch.equal(rows["text_embeddings"][2], valid_rows(negative[0], negative[1])[0])


@pytest.mark.parametrize("latent_dist", ["mode", "sample"])
def test_cached_latents_are_the_vae_s_scaled_latents(pipe, encoder, latent_dist, monkeypatch) -> None:
    settings = EncoderSettings(dtype="float32", max_sequence_length=MAX_TOKENS, latent_dist=latent_dist)
    monkeypatch.setattr(encoder, "settings", settings)
    count = 2 if latent_dist == "mode" else 1  # a batch of clips; a seeded sample
    clips = [_clip(5, 32, 48, seed) for seed in range(count)]
    generators = [torch.Generator().manual_seed(k) for k in range(count)]
    got = encoder.encode_videos(clips, generators)
    assert set(got) == {"video_latents"}  # a text-to-video folder: no image encoder
    latents = got["video_latents"]
    assert latents.shape == (count, C, 2, 2, 3)
    for k, clip in enumerate(clips):
        pixels = pipe.video_processor.preprocess(clip).permute(1, 0, 2, 3)[None]
        dist = pipe.vae.encode(pixels).latent_dist
        z = dist.sample(torch.Generator().manual_seed(k)) if latent_dist == "sample" else dist.mode()
        assert torch.equal(latents[k : k + 1], z * pipe.vae.config.scaling_factor)
    # The pipeline decodes latents / scaling_factor: the cached latents are the transformer's space.
    if latent_dist == "mode":  # the causal VAE: a clip's first latent frame is its first frame's
        still = encoder.encode_images([clips[0][0]])["video_latents"]
        assert still.shape == (1, C, 1, 2, 3)
        torch.testing.assert_close(still[:, :, 0], latents[:1, :, 0])


# ---------------------------------------------------------------------------------- adapter


def _padded_text(rows: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The rows collated as the loader collates the cache (zero-padded, masked if padded)."""
    fields = ("text_embeddings", "text_embeddings_2")
    samples = [{field: rows[field][i] for field in fields} for i in range(len(rows["text_embeddings"]))]
    return CacheCollator(fields)(samples)


def _rows(rows: dict[str, list[torch.Tensor]], which: list[int]) -> dict[str, list[torch.Tensor]]:
    return {field: [values[i] for i in which] for field, values in rows.items()}


def test_t2v_inputs_and_prediction_equal_the_pipeline_s(pipe, rows) -> None:
    text = _padded_text(_rows(rows, [0, 1]))
    negative = _padded_text(_rows(rows, [2, 2]))
    calls, outputs = transformer_calls(
        pipe, **HunyuanVideoEncoder.prompt_inputs(text), **HunyuanVideoEncoder.negative_inputs(negative),
        height=32, width=48, num_frames=5, num_inference_steps=1, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert len(calls) == 2  # the prompt's pass and the negative prompt's
    adapter = HunyuanVideoAdapter()
    for call, output, batch in zip(calls, outputs, (text, negative), strict=True):
        noisy = call["hidden_states"][:, :C]
        t = pipe.scheduler.timesteps[0].expand(2)
        inputs = adapter.prepare_inputs(_context(noisy, torch.randn_like(noisy), t, dict(batch)))
        ours, pred = _adapter_call(adapter, pipe.transformer, inputs)
        _assert_same_call(ours, call)
        assert call["image_embeds"].shape == (2, IMAGE_TOKENS, 16)
        assert torch.equal(pred, output)


def test_unpadded_text_predicts_as_the_pipeline_s_padded_text(pipe, rows) -> None:
    with torch.no_grad():
        text, mask, text_2, mask_2 = pipe.encode_prompt(PROMPTS[0], device="cpu")
    noisy = torch.randn(1, C, 2, 2, 3)
    t = torch.tensor([700.0])
    adapter = HunyuanVideoAdapter()
    padded = {"text_embeddings": text, "text_embeddings_mask": mask.bool(),
              "text_embeddings_2": text_2, "text_embeddings_2_mask": mask_2.bool()}  # fmt: skip
    with torch.no_grad():
        full = adapter.forward(pipe.transformer, adapter.prepare_inputs(_context(noisy, noisy, t, padded)))
        batch = _padded_text(_rows(rows, [0]))
        short = adapter.forward(pipe.transformer, adapter.prepare_inputs(_context(noisy, noisy, t, batch)))
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def test_the_key_mask_attention_changes_no_prediction_or_gradient(rows) -> None:
    """The family's transformer patch (flowtune's attention processor, which masks the text's
    padding as keys only) against diffusers' dense mask: the same prediction and the same
    gradient of a loss for every parameter, with text rows padded to different lengths."""
    from flowtune.families.hunyuan_video.attention import KeyMaskAttnProcessor
    from flowtune.families.hunyuan_video.tiny import tiny_hunyuan_transformer

    torch.manual_seed(0)
    theirs = tiny_hunyuan_transformer().train()
    ours = SPEC.patch_transformer(copy.deepcopy(theirs))
    assert all(isinstance(b.attn.processor, KeyMaskAttnProcessor) for b in ours.transformer_blocks)
    batch = _padded_text(_rows(rows, [0, 1]))
    assert not batch["text_embeddings_mask"].all()  # padding to mask
    noisy = torch.randn(2, C, 2, 2, 3)
    adapter = HunyuanVideoAdapter()
    inputs = adapter.prepare_inputs(_context(noisy, noisy, torch.tensor([700.0, 300.0]), dict(batch)))
    weight = torch.randn(2, C, 2, 2, 3)
    results = []
    for model in (theirs, ours):
        pred = adapter.forward(model, inputs)
        (pred * weight).sum().backward()
        results.append((pred.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (pred, grads), (our_pred, our_grads) = results
    assert torch.equal(our_pred, pred)
    assert grads.keys() == our_grads.keys()
    assert all(torch.equal(our_grads[n], g) for n, g in grads.items() if g is not None)


def test_i2v_inputs_and_cached_condition_equal_the_image_to_video_pipeline_s(i2v_pipe, i2v_dir, rows) -> None:
    encoder = _encoder(i2v_dir)
    assert encoder.vision and "image_embeds" in encoder.image_fields
    height, width = i2v_pipe.video_processor.calculate_default_height_width(48, 64, i2v_pipe.target_size)
    image = _clip(1, height, width, seed=3)[0]  # already at the pipeline's size: no resize or crop
    text = _padded_text(_rows(rows, [0]))
    negative = _padded_text(_rows(rows, [2]))
    calls, outputs = transformer_calls(
        i2v_pipe, image=image, **HunyuanVideoEncoder.prompt_inputs(text),
        **HunyuanVideoEncoder.negative_inputs(negative), num_frames=5, num_inference_steps=1,
        output_type="latent", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    call = calls[0]
    # The image's cached latent and SigLIP embeddings are the pipeline's condition; a clip's first
    # latent frame is the same up to rounding (the causal VAE sees the first frame alone).
    still = encoder.encode_videos([[image]])
    assert torch.equal(still["video_latents"][:, :, 0], call["hidden_states"][:, C : 2 * C, 0])
    assert torch.equal(still["image_embeds"], call["image_embeds"])
    cached = encoder.encode_videos([[image, *_clip(4, height, width, seed=4)]])
    assert cached["video_latents"].shape[2] == call["hidden_states"].shape[2]
    torch.testing.assert_close(cached["video_latents"][:, :, 0], still["video_latents"][:, :, 0])
    assert torch.equal(cached["image_embeds"], still["image_embeds"])

    adapter = HunyuanVideoAdapter()
    noisy = call["hidden_states"][:, :C]
    batch = {**text, "image_embeds": cached["image_embeds"]}
    t = i2v_pipe.scheduler.timesteps[0].expand(1)
    latents = cached["video_latents"].clone()
    latents[:, :, 0] = still["video_latents"][:, :, 0]
    context = _context(noisy, latents, t, batch, i2v=torch.tensor([True]))
    ours, pred = _adapter_call(adapter, i2v_pipe.transformer, adapter.prepare_inputs(context))
    _assert_same_call(ours, call)
    assert torch.equal(pred, outputs[0])


def test_i2v_condition_only_for_the_i2v_samples_and_dropout_zeroes_both_texts() -> None:
    latents = torch.randn(2, C, 3, 2, 2)
    batch = {
        "text_embeddings": torch.randn(2, 5, 32),
        "text_embeddings_mask": torch.tensor([[True] * 5, [True] * 3 + [False] * 2]),
        "text_embeddings_2": torch.randn(2, 4, 24),
        "image_embeds": torch.randn(2, 4, 16),
    }
    context = _context(torch.randn_like(latents), latents, torch.tensor([300.0, 800.0]), batch,
                       i2v=torch.tensor([True, False]))  # fmt: skip
    context.cfg_dropout_mask = torch.tensor([False, True])
    inputs = HunyuanVideoAdapter().prepare_inputs(context)
    hidden = inputs["hidden_states"]
    assert hidden.shape == (2, 2 * C + 1, 3, 2, 2)
    assert torch.equal(hidden[0, C : 2 * C, 0], latents[0, :, 0])  # the clean first frame
    assert torch.equal(hidden[0, 2 * C], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 2, 2))
    assert not hidden[0, C : 2 * C, 1:].any() and not hidden[1, C:].any()  # t2v sample: zeros
    assert torch.equal(inputs["image_embeds"][0], batch["image_embeds"][0])
    assert not inputs["image_embeds"][1].any()
    assert torch.equal(inputs["encoder_hidden_states"][0], batch["text_embeddings"][0])
    assert not inputs["encoder_hidden_states"][1].any() and not inputs["encoder_hidden_states_2"][1].any()
    assert inputs["encoder_attention_mask"].dtype == torch.float32
    assert inputs["encoder_attention_mask"][1].tolist() == [1.0] * 3 + [0.0] * 2  # the mask is kept
    assert torch.equal(inputs["encoder_attention_mask_2"], torch.ones(2, 4))
    assert torch.equal(inputs["timestep"], torch.tensor([300.0, 800.0]))


def test_example_batch_runs_a_training_step(pipe) -> None:
    from flowtune.flow_matching.adapters.base import ExampleSize

    adapter = HunyuanVideoAdapter()
    config = dict(pipe.transformer.config)
    shapes = adapter.example_shapes(config, ExampleSize(1, 32, 48, 7))
    assert shapes["text_embeddings"] == (1, 7, 32) and shapes["text_embeddings_2"] == (1, 0, 24)
    assert shapes["video_latents"] == (1, C, 1, 2, 3)
    batch = adapter.example_batch(config, 1, 32, 48, 7)
    latents = batch["video_latents"]
    pred = adapter.forward(
        pipe.transformer, adapter.prepare_inputs(_context(latents, latents, torch.tensor([500.0]), batch))
    )
    assert pred.shape == latents.shape
    pred.float().pow(2).mean().backward()


def test_example_batch_has_the_clip_s_latent_frames(pipe) -> None:
    config = dict(pipe.transformer.config)
    batch = HunyuanVideoAdapter().example_batch(config, 2, 32, 48, 7, frames=9)
    assert batch["video_latents"].shape == (2, C, 3, 2, 3)  # 9 frames -> 3 latent frames


# ----------------------------------------------------------------------------- LoRA files


def test_lora_file_loads_back_into_the_pipeline_s_transformer(pipe, tmp_path: Path) -> None:
    """HunyuanVideo15Pipeline has no LoRA mixin: the file is written through the family's
    ``lora_loader`` and read by the transformer's own ``load_lora_adapter``, to the same output."""
    import copy

    from diffusers import HunyuanVideo15Transformer3DModel

    from flowtune.train.model import add_lora, save_lora

    assert (
        not hasattr(type(pipe), "save_lora_weights") and SPEC.lora_class().transformer_name == "transformer"
    )
    trained = copy.deepcopy(pipe.transformer)
    params = add_lora(trained, SPEC, rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.1)
    path = save_lora(trained, SPEC, tmp_path)
    fresh = HunyuanVideo15Transformer3DModel.from_config(pipe.transformer.config)
    fresh.load_state_dict(pipe.transformer.state_dict())
    fresh.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer", adapter_name="x")
    lora_modules = {n.rsplit(".lora_B", 1)[0] for n, _ in fresh.named_modules() if n.endswith("lora_B.x")}
    assert len(lora_modules) == 12 * config_layers(pipe) and all(
        n.startswith("transformer_blocks.") for n in lora_modules
    )  # the 12 targets of every double-stream block, not the token refiner's namesakes
    latents = torch.randn(1, C, 2, 2, 3)
    batch = {"text_embeddings": torch.randn(1, 5, 32), "text_embeddings_2": torch.randn(1, 3, 24)}
    adapter = HunyuanVideoAdapter()
    inputs = adapter.prepare_inputs(_context(latents, latents, torch.tensor([400.0]), batch))
    with torch.no_grad():
        torch.testing.assert_close(adapter.forward(fresh, inputs), adapter.forward(trained, inputs))


def config_layers(pipe) -> int:
    return int(pipe.transformer.config.num_layers)


# ---------------------------------------------------------------------------------- export

# Tencent's HunyuanVideo 1.5 module of each diffusers module in a double-stream block, as diffusers'
# scripts/convert_hunyuan_video1_5_to_diffusers.py renames them (written out here, not taken from
# flowtune.families.hunyuan_video.naming): the names musubi-tuner's LoRAs use.
TENCENT_15 = {
    "img_attn_q": "attn.to_q", "img_attn_k": "attn.to_k", "img_attn_v": "attn.to_v",
    "img_attn_proj": "attn.to_out.0", "txt_attn_q": "attn.add_q_proj", "txt_attn_k": "attn.add_k_proj",
    "txt_attn_v": "attn.add_v_proj", "txt_attn_proj": "attn.to_add_out", "img_mlp_fc1": "ff.net.0.proj",
    "img_mlp_fc2": "ff.net.2", "txt_mlp_fc1": "ff_context.net.0.proj", "txt_mlp_fc2": "ff_context.net.2",
    "img_mod_linear": "norm1.linear", "txt_mod_linear": "norm1_context.linear",
}  # fmt: skip


def test_exported_files_map_back_to_the_trained_modules(tmp_path: Path) -> None:
    """A LoRA on the default targets and the video stream's modulation (scale 2, one module at rank
    2 and scale 2 too), exported:

    - ``comfyui`` (``diffusion_model.double_blocks.{i}.img_attn_qkv`` etc., fused q/k/v, peft
      names): diffusers' HunyuanVideo converter (``HunyuanVideoLoraLoaderMixin.lora_state_dict``)
      maps every module back, and the transformer with it predicts as with the trained LoRA;
    - ``kohya`` (musubi-tuner's ``lora_unet_double_blocks_{i}_img_attn_q`` etc.): every key is a
      Tencent HunyuanVideo 1.5 module (TENCENT_15), whose ``alpha / R * up @ down`` is the trained
      module's peft update."""
    import copy

    from diffusers.loaders.lora_pipeline import HunyuanVideoLoraLoaderMixin
    from peft import LoraConfig
    from safetensors.torch import load_file

    from flowtune.families.hunyuan_video.tiny import tiny_hunyuan_transformer
    from flowtune.interop.lora import write_lora
    from flowtune.train.model import LORA_WEIGHTS_NAME, expand_target_modules, save_lora

    torch.manual_seed(0)
    base = tiny_hunyuan_transformer()
    trained = copy.deepcopy(base)
    targets = expand_target_modules(trained, [*SPEC.lora_target_modules, "transformer_blocks.*.norm1.linear"])
    odd = "transformer_blocks.0.attn.to_k"
    config = LoraConfig(
        target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False,
        rank_pattern={odd: 2}, alpha_pattern={odd: 4},
    )  # fmt: skip
    trained.add_adapter(config)
    save_lora(trained, SPEC, tmp_path / "lora")
    lora = tmp_path / "lora" / LORA_WEIGHTS_NAME
    modules = {n: m for n, m in trained.named_modules() if hasattr(m, "lora_A")}
    assert len(modules) == 2 * 13
    files = {fmt: tmp_path / f"{fmt}.safetensors" for fmt in ("kohya", "comfyui")}
    assert write_lora(lora, SPEC, "kohya", files["kohya"], None) == (26, 26)
    assert write_lora(lora, SPEC, "comfyui", files["comfyui"], None) == (26, 18)  # q/k/v fused

    converted = HunyuanVideoLoraLoaderMixin.lora_state_dict(str(files["comfyui"]))
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted} == set(modules)
    loaded = copy.deepcopy(base)
    loaded.load_lora_adapter(converted, prefix="transformer", adapter_name="comfyui")
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 2 * C + 1, 2, 2, 3, generator=g),
        "timestep": torch.tensor([400.0]),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=g),
        "encoder_attention_mask": torch.ones(1, 5),
        "encoder_hidden_states_2": torch.randn(1, 3, 24, generator=g),
        "encoder_attention_mask_2": torch.ones(1, 3),
        "image_embeds": torch.zeros(1, 4, 16),
        "return_dict": False,
    }
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)[0], trained(**inputs)[0])

    state = load_file(str(files["kohya"]))
    seen = set()
    for key in {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}:
        block, name = key.removeprefix("lora_unet_double_blocks_").split("_", 1)
        module = f"transformer_blocks.{block}.{TENCENT_15[name]}"
        down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
        delta = state[f"{key}.alpha"] / down.shape[0] * up @ down
        torch.testing.assert_close(delta, modules[module].get_delta_weight("default"))
        seen.add(module)
    assert seen == set(modules) and len(state) == 3 * len(modules)


# ------------------------------------------------------------------------------ plan configs


@pytest.mark.parametrize(
    ("component", "billions"),
    [("transformer", (8.2, 8.4)), ("text_encoder", (7.0, 7.1)), ("text_encoder_2", (0.21, 0.22))],
)
def test_bundled_configs_build_at_the_published_sizes(component, billions) -> None:
    """The bundled configs of the 480p text-to-video model (flowtune plan offline): the 8.3B
    transformer, Qwen2.5-VL-7B's text model (7.07B) and ByT5-small (0.22B)."""
    from tests.helpers import bundled_billions

    hub = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v"
    assert billions[0] < bundled_billions(hub, component, SPEC.transformer_class) < billions[1]


@pytest.mark.parametrize("image", ["t2v", "i2v"])
def test_plan_stand_in_predicts_as_the_transformer(image: str) -> None:
    """flowtune plan's stand-in for the transformer's forward (FamilySpec.plan_forward), which reads
    no value, predicts as diffusers' forward on padded text (both texts), with zero image
    embeddings (text-to-video: image tokens masked out) or real ones."""
    from flowtune.families.hunyuan_video.plan import traceable_forward
    from flowtune.families.hunyuan_video.tiny import tiny_hunyuan_transformer

    torch.manual_seed(0)
    model = tiny_hunyuan_transformer()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 2 * C + 1, 2, 2, 3, generator=g),
        "timestep": torch.tensor([400.0, 700.0]),
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32),
        "encoder_hidden_states_2": torch.randn(2, 3, 24, generator=g),
        "encoder_attention_mask_2": torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.float32),
        "image_embeds": torch.zeros(2, 4, 16) if image == "t2v" else torch.randn(2, 4, 16, generator=g),
        "return_dict": False,
    }
    assert SPEC.load_plan_forward() is traceable_forward
    with torch.no_grad():
        torch.testing.assert_close(traceable_forward(model, **inputs)[0], model(**inputs)[0])


def test_plan_traces_the_family_on_the_tiny_folder(t2v_dir: Path) -> None:
    """On the tiny folder: a training step of clips with i2v_prob (traced as image-to-video, the
    worst case) and the validation clip's denoising forward trace on fake tensors, through the
    stand-in; without it the plan says in one line that it cannot trace the transformer."""
    from flowtune.errors import FlowtuneError
    from flowtune.memory.plan import trace_recipe
    from flowtune.recipe import load_recipe

    recipe = load_recipe(
        "tiny-hunyuan-video-demo",
        [f"model.pretrained={t2v_dir}", "data.resolution=32", "data.frames=5", "flow.i2v_prob=0.5"],
    )
    trace = trace_recipe(recipe, SPEC)
    assert trace.sampling_peak > 0 and trace.plan(recipe, SPEC).activations > 0
    without = dataclasses.replace(SPEC, plan_forward=None)
    with pytest.raises(
        FlowtuneError, match="flowtune plan cannot trace the HunyuanVideo15Transformer3DModel"
    ):
        trace_recipe(recipe, without)


def test_sample_starts_an_image_to_video_clip_from_its_first_frame(
    i2v_dir: Path, t2v_dir: Path, tmp_path: Path
) -> None:
    """`flowtune sample --image` on an image-to-video checkpoint (FamilySpec.first_frame_images):
    the clip equals HunyuanVideo15ImageToVideoPipeline's from that first frame, frame for frame;
    a text-to-video checkpoint refuses the image in one line."""
    from tests.helpers import assert_user_error, cli

    first = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(first)
    out = tmp_path / "out"
    result = cli(
        "sample", "--model", i2v_dir, "-p", "a blue square", "--image", first, "--frames", "5", "--steps", "2",
        "--seed", "5", "--guidance", "2.5", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pipe = _pipe("HunyuanVideo15ImageToVideoPipeline", i2v_dir)
    pipe.guider = pipe.guider.new(guidance_scale=2.5)
    frames = pipe(
        image=Image.open(first).convert("RGB"), prompt="a blue square", negative_prompt="", num_frames=5,
        num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="pil",
    ).frames[0]  # fmt: skip
    strip = np.asarray(Image.open(out / "000000.png"))
    assert np.array_equal(strip, np.concatenate([np.asarray(frame) for frame in frames], axis=1))
    assert_user_error(
        cli("sample", "--model", t2v_dir, "-p", "a blue square", "--image", first, "--out", tmp_path / "t2v"),
        "text-to-video model",
    )


# In `make test-extended` (7 s): the trainer's image-to-video validation path is shared with Wan
# I2V, whose test (tests/test_wan_i2v.py) runs in `make test`; this family's image-to-video
# sampling is test_sample_starts_an_image_to_video_clip_from_its_first_frame's.
@pytest.mark.extended
def test_validation_clips_start_from_their_first_frame_on_an_image_to_video_checkpoint(
    t2v_dir: Path, i2v_dir: Path, tmp_path: Path
) -> None:
    """An image-to-video run (`flow.i2v_prob` 0.5, the first frames taken from the clips) trains
    and writes its validation clip from `validation.images` (through the image-to-video pipeline,
    as `flowtune sample --image`, whose clip the test above compares frame for frame).  On a
    text-to-video checkpoint `flowtune train` refuses
    `validation.images` in one line, before its first step (not at the first validation)."""
    from flowtune.data.synthetic import make_video_dataset
    from tests.helpers import assert_user_error, cli, save_image, write

    make_video_dataset(tmp_path / "data", 2, sizes=[(32, 32)], frames=5, fps=24)
    save_image(tmp_path / "first.png", (32, 32))

    def recipe(model: Path, name: str) -> Path:
        return write(
            tmp_path / f"{name}.yaml",
            f"model: {{family: hunyuan-video, pretrained: '{model}', dtype: float32}}\n"
            f"data: {{source: '{tmp_path / 'data'}', cache_dir: '{tmp_path / name}-cache', resolution: 32,"
            " frames: 5, max_sequence_length: 16}\n"
            "flow: {i2v_prob: 0.5}\n"
            f"train: {{output_dir: '{tmp_path / name}', max_steps: 1, mixed_precision: 'no', batch_size: 2}}\n"
            f"validation: {{prompts: [a blue square], images: ['{tmp_path / 'first.png'}'], height: 32,"
            " width: 32, frames: 5, steps: 2}\n",
        )

    i2v = recipe(i2v_dir, "i2v")
    assert cli("preprocess", i2v).returncode == 0
    result = cli("train", i2v)
    assert result.returncode == 0, result.stderr
    samples = tmp_path / "i2v" / "samples" / "step-000001"
    assert (samples / "000000.mp4").is_file()
    strip = Image.open(samples / "000000.png")
    assert strip.size[0] == 5 * strip.size[1]  # five frames side by side, as the image's size

    t2v = recipe(t2v_dir, "t2v")
    assert cli("preprocess", t2v).returncode == 0
    assert_user_error(cli("train", t2v), "validation.images", "text-to-video model")
    assert not (tmp_path / "t2v" / "checkpoints").exists()
