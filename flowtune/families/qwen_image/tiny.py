"""Qwen-Image's tiny random pipeline (``flowtune make-tiny qwen-image``): Qwen-Image's components
and geometry at minimal widths and depths (see :mod:`flowtune.tiny`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flowtune.tiny import CAPTION_WORDS, component_seed

if TYPE_CHECKING:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

# Sizes of the tiny Qwen-Image components.  Qwen-Image's geometry is kept: a 16-channel VAE that
# downsamples by 8 (a causal 3D VAE, images are one-frame videos) with per-channel latent
# statistics in its config, 2x2 patches packed into 64-feature tokens, 3-axis RoPE (frame,
# height, width), and a Qwen2.5-VL text encoder whose last hidden state is the text input.
QWEN_HIDDEN = 32  # the text encoder's width = the transformer's joint_attention_dim
QWEN_LAYERS = 2
QWEN_LATENT_CHANNELS = 16  # x 2 x 2 patch = 64 transformer input channels
TRANSFORMER_HIDDEN = 64  # a latent token's 64 features (see tests.helpers.wide_tiny_model)
QWEN_MAX_LENGTH = 32768  # the real tokenizer's model_max_length

# Qwen2.5-VL's special tokens, in the real vocabulary's order (its ids start at 151643).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Words of edit instructions and of the Qwen-Image pipelines' system prompts, besides CAPTION_WORDS.
_EDIT_WORDS = (
    "make turn change into remove add replace color colour shape star ring cross large Picture".split()
)
_CHAT_WORDS = ("system", "user", "assistant")


def _templates() -> list[str]:
    """QwenImagePipeline's and QwenImageEditPlusPipeline's prompt templates, the prompt left out
    (read from diffusers, so that the tiny tokenizer spells them as the real one does)."""
    from flowtune.families.qwen_image.encoder import prompt_template

    names = ("QwenImagePipeline", "QwenImageEditPlusPipeline")
    return [prompt_template(name)[0].replace("{}", " ") for name in names]


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE tokenizer over a small vocabulary, built offline.

    Its BPE merges are trained here (``tokenizers``' BpeTrainer, deterministic) on the caption and
    edit words and on the pipelines' prompt templates, so each of those words is one token (with
    or without its leading space) as in Qwen's 151k vocabulary, and so is each punctuation run of
    the templates; any other text falls back to bytes.  With the real pre-tokenizer
    (Qwen2Tokenizer's regex) the text before the prompt is 34 tokens in QwenImagePipeline's
    template and 64 in QwenImageEditPlusPipeline's, exactly their
    ``prompt_template_encode_start_idx``: the tokens they drop are the template's, as with Qwen.
    The special tokens come first (ids 0-13, in Qwen's order).
    """
    import json

    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    templates = _templates()
    words = [*CAPTION_WORDS, *_EDIT_WORDS, *_CHAT_WORDS, *re.findall(r"[A-Za-z]+", " ".join(templates))]
    corpus = [
        form
        for word in dict.fromkeys(words)
        for form in (word, " " + word, word.capitalize(), " " + word.capitalize())
    ]
    corpus += templates  # their punctuation runs (" (", "'s", ...) become tokens too
    backend = Tokenizer(BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=4096,  # more than the corpus can fill: every word is merged whole
        min_frequency=1,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    model = json.loads(backend.to_str())["model"]
    endoftext, im_start, im_end, *_ = SPECIAL_TOKENS
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(merge) for merge in model["merges"]],
        unk_token=None,
        eos_token=im_end,  # Qwen2.5-VL-Instruct's
        pad_token=endoftext,
        extra_special_tokens=[token for token in SPECIAL_TOKENS if token not in (endoftext, im_end)],
        model_max_length=QWEN_MAX_LENGTH,
    )


def qwen_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2.5-VL model: 2 text layers of width 32 (multimodal RoPE over 3 sections) and a
    1-block vision tower (14-pixel patches merged 2x2, as Qwen2.5-VL's), its special-token ids
    those of ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)), strict=True))
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": QWEN_HIDDEN,
        "intermediate_size": 2 * QWEN_HIDDEN,
        "num_hidden_layers": QWEN_LAYERS,
        "max_window_layers": QWEN_LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        # head_dim 16: 8 rotary frequencies split over (time, height, width) as Qwen's 16/24/24 of 64
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": QWEN_HIDDEN,
        "fullatt_block_indexes": [0],
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_vae() -> AutoencoderKLQwenImage:
    """Qwen-Image's VAE layout (a causal 3D VAE: 4 levels downsampling by 8, 16 latent channels)
    at 8 channels wide, its ``latents_mean`` / ``latents_std`` those of its own latents of
    synthetic shape images (:func:`_latent_statistics`), as Qwen-Image's are of its latents."""
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=QWEN_LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1
    ).eval()
    mean, std = _latent_statistics(vae)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return vae


@torch.no_grad()
def _latent_statistics(vae: AutoencoderKLQwenImage, count: int = 16, size: int = 32) -> tuple[list, list]:
    """Per-channel mean and standard deviation of ``vae``'s latents (``latent_dist.mode()``) of
    ``count`` synthetic shape images, rounded to 4 decimals as Qwen-Image's config gives them.

    With the real statistics a random VAE's latents would not be unit-variance, and training on
    the tiny model would hardly see the images against the noise.
    """
    import numpy as np

    from flowtune.data.synthetic import draw_shape, sample_specs

    images = [
        np.asarray(draw_shape(spec, size, size), dtype=np.float32) for spec in sample_specs(count, seed=0)
    ]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)[:, :, None] / 127.5 - 1.0
    latents = vae.encode(pixels).latent_dist.mode()  # [count, 16, 1, size / 8, size / 8]
    mean, std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
    return [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()]


def tiny_qwen_transformer(hidden: int = TRANSFORMER_HIDDEN) -> QwenImageTransformer2DModel:
    """A Qwen-Image-shaped transformer: 2 blocks, ``hidden`` wide (a multiple of 16; default 64,
    a latent token's features) in two heads of ``hidden / 2``, RoPE over (frame, height, width)
    in Qwen-Image's 16:56:56 proportions.

    Takes packed latents [B, N, 64] and Qwen2.5-VL embeddings [B, L, 32]; random weights from
    torch's global RNG.
    """
    from diffusers import QwenImageTransformer2DModel

    head = hidden // 2
    frame = head // 8 if head // 8 % 2 == 0 else head // 8 + 1
    side = (head - frame) // 2
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=QWEN_LATENT_CHANNELS * 4,
        out_channels=QWEN_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=head,
        num_attention_heads=2,
        joint_attention_dim=QWEN_HIDDEN,
        axes_dims_rope=(frame, side, head - frame - side),
    ).eval()
    _open_gates(transformer)
    return transformer


@torch.no_grad()
def _open_gates(transformer: QwenImageTransformer2DModel) -> None:
    """Set the biases of every block's residual gates (the 3rd and 6th of the six modulation
    chunks: shift, scale, gate for attention, then for the MLP, in both streams) to 1.

    A random block's gates come out of its modulation layer near 0 (about 0.07 here: the bias
    init dominates a small timestep embedding), which mutes every attention and MLP branch, so
    LoRAs on those hardly move the output and the tiny model learned nothing in a test's few
    hundred steps; a trained Qwen-Image's branches do contribute.
    """
    dim = transformer.inner_dim
    for block in transformer.transformer_blocks:
        for modulation in (block.img_mod[1], block.txt_mod[1]):
            modulation.bias[2 * dim : 3 * dim] = 1.0
            modulation.bias[5 * dim : 6 * dim] = 1.0


def qwen_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen-Image's scheduler config: exponential time shift, mu from the image's token count
    (``QwenImagePipeline`` computes it), the last sigma stretched to 0.02."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )


def tiny_qwen_components(seed: int) -> dict:
    """The tiny pipeline's components (``scheduler``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``transformer``), each seeded by ``seed`` and its name; the caller's RNG is untouched."""
    tokenizer = qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(seed, "text_encoder"))
        text_encoder = qwen_text_encoder(tokenizer)
        torch.manual_seed(component_seed(seed, "vae"))
        vae = qwen_vae()
        torch.manual_seed(component_seed(seed, "transformer"))
        transformer = tiny_qwen_transformer()
    return {
        "scheduler": qwen_scheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def build_tiny_qwen_image(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random Qwen-Image-shaped pipeline (``QwenImagePipeline``) to ``out_dir``.

    Like FLUX.1's :func:`flowtune.families.flux.tiny.build_tiny_flux`: loads with
    ``QwenImagePipeline.from_pretrained``, weights depend only on ``seed``, the caller's RNG is
    untouched.
    """
    from diffusers import QwenImagePipeline

    QwenImagePipeline(**tiny_qwen_components(seed)).save_pretrained(out_dir, safe_serialization=True)
