"""Tests for flowtune.tiny: offline tiny random pipelines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import flowtune.families.flux.tiny
from flowtune.errors import FlowtuneError
from flowtune.families.flux.tiny import VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR
from flowtune.tiny import make_tiny

os.environ["HF_HUB_OFFLINE"] = "1"

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
WEIGHT_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def _weights(model_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """All safetensors tensors of a pipeline directory, keyed by relative file path."""
    return {
        str(path.relative_to(model_dir)): load_file(path) for path in sorted(model_dir.rglob("*.safetensors"))
    }


def _same_tensors(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    if a.keys() != b.keys():
        return False
    for name in a:
        if a[name].keys() != b[name].keys():
            return False
        if not all(torch.equal(a[name][key], b[name][key]) for key in a[name]):
            return False
    return True


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny("flux", tmp_path_factory.mktemp("tiny") / "flux", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_dir)


def test_layout(tiny_dir: Path) -> None:
    assert tiny_dir.is_absolute()
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for component in COMPONENTS:
        assert (tiny_dir / component).is_dir(), component
        assert index[component][0] in ("diffusers", "transformers"), component
    for component in WEIGHT_COMPONENTS:
        assert list((tiny_dir / component).glob("*.safetensors")), component
        assert not list((tiny_dir / component).glob("*.bin")), component
    # No staging directories left beside the result.
    assert [p.name for p in tiny_dir.parent.iterdir()] == [tiny_dir.name]


def test_real_flux_geometry(pipe) -> None:
    vae, transformer = pipe.vae.config, pipe.transformer.config
    assert pipe.vae_scale_factor == 8
    assert vae.latent_channels == 16
    assert (vae.scaling_factor, vae.shift_factor) == (VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    assert transformer.patch_size == 1 and transformer.in_channels == 64
    assert transformer.guidance_embeds
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert transformer.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert transformer.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    scheduler = pipe.scheduler.config
    assert scheduler.use_dynamic_shifting and scheduler.shift == 3.0
    assert (scheduler.base_shift, scheduler.max_shift) == (0.5, 1.15)
    assert (scheduler.base_image_seq_len, scheduler.max_image_seq_len) == (256, 4096)


def test_normalized_latents_have_unit_scale_like_real_ones(pipe, tmp_path: Path) -> None:
    """The tiny VAE's scaling/shift factors give images' latents about zero mean and unit
    variance, as FLUX.1's factors do for its VAE (so noise and data are on the same scale)."""
    from PIL import Image

    from flowtune.data.synthetic import make_shapes_dataset

    paths = make_shapes_dataset(tmp_path / "shapes", 12, seed=4)
    images = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
            for p in paths
        ]
    )
    config = pipe.vae.config
    with torch.no_grad():
        latents = (pipe.vae.encode(images).latent_dist.mode() - config.shift_factor) * config.scaling_factor
    assert abs(latents.mean().item()) < 0.1
    assert 0.7 < latents.std().item() < 1.4


def test_generates_64x64_image(pipe) -> None:
    kwargs = dict(height=64, width=64, num_inference_steps=2, guidance_scale=3.5)
    image = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert image.size == (64, 64)
    array = pipe(
        "a red square", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs
    ).images
    assert array.shape == (1, 64, 64, 3)
    assert np.isfinite(array).all()


def test_long_prompt_is_truncated(pipe) -> None:
    prompt = "a very long prompt about a red square on a blue background " * 20
    latents = pipe(
        prompt, height=64, width=64, num_inference_steps=1, output_type="latent", max_sequence_length=128
    ).images
    assert latents.shape == (1, 16, 64)  # (64 / 16)^2 packed tokens of 16 x 2 x 2 channels
    assert torch.isfinite(latents).all()


def test_clip_tokenizer(pipe) -> None:
    tokenizer, config = pipe.tokenizer, pipe.text_encoder.config
    assert tokenizer.model_max_length == 77 == config.max_position_embeddings
    assert len(tokenizer) == config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id)
    encoded = tokenizer("A photo of a cat, 3 dogs!", padding="max_length", max_length=77)
    ids, mask = encoded.input_ids, encoded.attention_mask
    assert len(ids) == 77
    last = sum(mask) - 1
    assert ids[0] == tokenizer.bos_token_id
    assert ids[last] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:last]
    # CLIP lowercases and decodes every pre-tokenized word (punctuation included) space-separated.
    assert tokenizer.decode(ids[1:last]) == "a photo of a cat , 3 dogs !"


def test_t5_tokenizer(pipe) -> None:
    tokenizer, config = pipe.tokenizer_2, pipe.text_encoder_2.config
    assert len(tokenizer) == config.vocab_size
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("A beautiful photo of a red square, highly detailed.").input_ids
    assert ids[-1] == 1
    assert 2 not in ids
    assert (
        tokenizer.decode(ids, skip_special_tokens=True)
        == "A beautiful photo of a red square, highly detailed."
    )
    padded = tokenizer("a cat", padding="max_length", max_length=512, truncation=True).input_ids
    assert len(padded) == 512 and padded[-1] == 0


def test_deterministic_per_seed(tiny_dir: Path, tmp_path: Path) -> None:
    reference = _weights(tiny_dir)
    assert _same_tensors(reference, _weights(make_tiny("flux", tmp_path / "again", seed=0)))
    other = _weights(make_tiny("flux", tmp_path / "other", seed=1))
    assert other.keys() == reference.keys()
    for name in reference:
        assert not all(torch.equal(reference[name][k], other[name][k]) for k in reference[name]), name


def test_size_under_2mb(tiny_dir: Path) -> None:
    size = sum(path.stat().st_size for path in tiny_dir.rglob("*") if path.is_file())
    assert size < 2 * 1024 * 1024


def test_refuses_non_empty_dir_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FlowtuneError, match="overwrite"):
        make_tiny("flux", out)
    assert (out / "keep.txt").read_text() == "mine"

    result = make_tiny("flux", out, overwrite=True)
    assert result == out.resolve()
    assert not (out / "keep.txt").exists()
    assert (out / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_accepts_existing_empty_dir(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert (make_tiny("flux", out) / "model_index.json").is_file()


def test_refuses_file(tmp_path: Path) -> None:
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(FlowtuneError):
        make_tiny("flux", out, overwrite=True)


def test_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(FlowtuneError, match="unknown model family"):
        make_tiny("no-such-family", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(out_dir: Path, seed: int) -> None:
        (out_dir / "model_index.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(flowtune.families.flux.tiny, "build_tiny_flux", broken)
    with pytest.raises(RuntimeError):
        make_tiny("flux", tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_keeps_global_rng_state(tmp_path: Path) -> None:
    before = torch.get_rng_state()
    make_tiny("flux", tmp_path / "model", seed=7)
    assert torch.equal(before, torch.get_rng_state())


def test_qwen3_tokenizer_keeps_the_words_whole_in_qwen3_s_chat_format() -> None:
    from flowtune.data.synthetic import SHAPES
    from flowtune.tiny import CAPTION_WORDS, qwen3_tokenizer, tiny_qwen3

    tokenizer = qwen3_tokenizer(["recolour"])
    for word in [*CAPTION_WORDS, *SHAPES, "recolour"]:
        assert tokenizer.tokenize(word) == [word] and tokenizer.tokenize(f" {word}") == [f"\u0120{word}"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "recolour the star"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert (
        text
        == "<|im_start|>user\nrecolour the star<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert len(tokenizer.tokenize(text)) == 3 + 12  # the markup takes 12 tokens, as in Qwen3
    assert "recolour" not in qwen3_tokenizer().get_vocab()  # only the words asked for
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<|endoftext|>",
        "<|im_end|>",
        None,
    )
    # Other text falls back to smaller pieces and bytes, none unknown.
    assert tokenizer.decode(tokenizer("Zebra 42!").input_ids) == "Zebra 42!"

    model = tiny_qwen3(tokenizer, hidden=8, layers=2, init_std=0.5, causal_lm=True, tie_word_embeddings=True)
    assert (
        type(model).__name__ == "Qwen3ForCausalLM" and model.lm_head.weight is model.model.embed_tokens.weight
    )
    assert model.config.vocab_size == len(tokenizer) and model.config.pad_token_id == tokenizer.pad_token_id
    base = tiny_qwen3(tokenizer, hidden=8, layers=2, init_std=0.5, causal_lm=False)
    assert type(base).__name__ == "Qwen3Model" and not base.config.tie_word_embeddings


def test_variants_build_the_family_s_other_checkpoint_kinds(tmp_path: Path) -> None:
    """``make-tiny FAMILY DIR --variant NAME``: every declared variant's builder imports; one is
    built through the command (a folder of one of the family's pipeline classes); an unknown
    variant is a one-line error naming the family's variants."""
    from flowtune.families import FAMILIES, get_family
    from tests.helpers import assert_user_error, cli

    variants = [(name, v) for name, spec in FAMILIES.items() for v, _ in spec.tiny_variants]
    assert ("wan", "a14b") in variants and ("hunyuan-video", "i2v") in variants
    for name, variant in variants:
        assert callable(get_family(name).load_tiny_builder(variant)), (name, variant)
    result = cli("make-tiny", "hunyuan-video", tmp_path / "i2v", "--variant", "i2v")
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "i2v" / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanVideo15ImageToVideoPipeline"
    assert index["_class_name"] in get_family("hunyuan-video").pipeline_classes
    assert_user_error(cli("make-tiny", "flux", tmp_path / "x", "--variant", "i2v"), "no tiny variant 'i2v'")
