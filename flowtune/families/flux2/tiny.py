"""FLUX.2's tiny random pipeline (``flowtune make-tiny flux2``): FLUX.2 [dev]'s components and
geometry at minimal widths and depths (see :mod:`flowtune.tiny`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flowtune.tiny import CAPTION_WORDS, TINY_VAE_LAYOUT, seeded_components, unigram_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Mistral3ForConditionalGeneration, PreTrainedTokenizerFast

# Sizes of the tiny FLUX.2 components.  FLUX.2 [dev]'s geometry is kept: a 32-channel VAE that
# downsamples by 8 with a batch norm over its 2x2-patchified latents (128 channels), 4-axis RoPE,
# guidance embedding, and a Mistral3 text encoder whose hidden states 10, 20 and 30 (what
# Flux2Pipeline stacks) are concatenated into the transformer's text input.
MISTRAL_HIDDEN = 16
MISTRAL_MAX_LENGTH = 512  # the tokenizer's model_max_length (as the tiny FLUX.1 T5's)
MISTRAL_LAYERS = 30  # Flux2Pipeline reads hidden states (10, 20, 30)
# Weight std of the tiny Mistral.  transformers' default 0.02 suits Mistral Small's width (5120); at
# width 16 its layers hardly mix tokens, so each hidden state is close to its own token's
# embedding: the tokens after the caption differ between captions by only ~9% (at 0.5: ~45%), only
# the ~6 caption words of the 48-token window carry the caption, and a LoRA on the tiny FLUX.2
# learns to ignore the text (the FLUX.2 test in tests/test_train_learning.py).  Trained LMs carry
# the context in every later token; 0.5 makes the random one do so too.
MISTRAL_INIT_STD = 0.5
FLUX2_LATENT_CHANNELS = 32  # x 2 x 2 patch = 128 transformer input channels
MISTRAL_SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "<pad>",
)
# Mistral's conversation format: the system message in [SYSTEM_PROMPT]...[/SYSTEM_PROMPT], user
# turns in [INST]...[/INST], assistant turns closed by </s>; message contents are lists of text
# (and image) parts, as Flux2Pipeline's format_input builds them.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- set text = namespace(value='') %}"
    "{%- if message['content'] is string %}{%- set text.value = message['content'] %}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{%- set text.value = text.value + part['text'] %}"
    "{%- else %}{%- set text.value = text.value + '[IMG]' %}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text.value }}[/SYSTEM_PROMPT]"
    "{%- elif message['role'] == 'user' %}[INST]{{ text.value }}[/INST]"
    "{%- else %}{{ text.value }}{{ eos_token }}{%- endif %}"
    "{%- endfor %}"
)
# Words of edit instructions, besides the caption words of CAPTION_WORDS.
EDIT_WORDS = "make turn change into remove add replace color colour shape star ring cross large".split()


def _mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A Mistral-style tokenizer with a chat template, over a small fixed vocabulary.

    Its vocabulary holds the caption words and the words of Flux2Pipeline's system message, so
    that the system message costs about one token per word and short ``max_sequence_length``
    settings still leave room for the caption.
    """
    import re

    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PreTrainedTokenizerFast

    system_words = re.findall(r"[A-Za-z]+", SYSTEM_MESSAGE)
    backend = unigram_tokenizer([*CAPTION_WORDS, *EDIT_WORDS, *system_words])
    unk, bos, eos, *control, pad = MISTRAL_SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=control,
        chat_template=MISTRAL_CHAT_TEMPLATE,
        model_max_length=MISTRAL_MAX_LENGTH,
    )


def _mistral3_text_encoder(tokenizer: PreTrainedTokenizerFast) -> Mistral3ForConditionalGeneration:
    """A Mistral3 (Mistral Small 3.x) vision-language model: 30 text layers of width 16 and a
    1-layer Pixtral vision tower, special-token ids matching ``tokenizer``."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=MISTRAL_HIDDEN,
        intermediate_size=2 * MISTRAL_HIDDEN,
        num_hidden_layers=MISTRAL_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=MISTRAL_HIDDEN // 2,
        max_position_embeddings=2048,
        initializer_range=MISTRAL_INIT_STD,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = PixtralVisionConfig(
        hidden_size=MISTRAL_HIDDEN,
        intermediate_size=2 * MISTRAL_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=MISTRAL_HIDDEN // 2,
        patch_size=16,
        image_size=64,
    )
    config = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
    )
    return Mistral3ForConditionalGeneration(config).eval()


def tiny_flux2_vae() -> AutoencoderKLFlux2:
    """FLUX.2's VAE layout (4 levels: downsampling by 8, 32 latent channels, batch norm over the
    2x2-patchified latents) at 8 channels wide; the batch norm's running statistics are those of
    its own latents of synthetic shape images (:func:`_calibrate_flux2_batch_norm`)."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(**TINY_VAE_LAYOUT, latent_channels=FLUX2_LATENT_CHANNELS).eval()
    _calibrate_flux2_batch_norm(vae)
    return vae


@torch.no_grad()
def _calibrate_flux2_batch_norm(vae: AutoencoderKLFlux2, count: int = 16, size: int = 64) -> None:
    """Set ``vae.bn``'s running mean and variance to the per-channel statistics of the VAE's
    patchified latents (``latent_dist.mode()``) of ``count`` synthetic shape images.

    FLUX.2's real statistics are what make *its* latents zero-mean and unit-variance; a random
    VAE's latents have other statistics, so they are measured the same way, and normalized tiny
    latents have unit variance like real ones (with the initial 0/1 the images would be several
    times smaller than the noise, and training would hardly see them).
    """
    import numpy as np
    from diffusers import Flux2Pipeline

    from flowtune.data.synthetic import draw_shape, sample_specs

    images = [
        np.asarray(draw_shape(spec, size, size), dtype=np.float32) for spec in sample_specs(count, seed=0)
    ]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    latents = Flux2Pipeline._patchify_latents(vae.encode(pixels).latent_dist.mode())
    vae.bn.running_mean.copy_(latents.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(latents.var(dim=(0, 2, 3)))


def tiny_flux2_transformer(guidance_embeds: bool = True, hidden: int = 32) -> Flux2Transformer2DModel:
    """A FLUX.2 [dev]-shaped transformer: 2 double- and 2 single-stream blocks, hidden size 32
    unless ``hidden`` (a multiple of 16) says otherwise, two heads of ``hidden / 2``, RoPE over
    four axes of ``hidden / 8``.

    Takes patchified latents [B, N, 128] and Mistral3 embeddings [B, L, 48] (three hidden states
    of width 16); random weights from torch's global RNG.  ``guidance_embeds=False`` gives a
    model without guidance embedding (like FLUX.2 [klein]).
    """
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=FLUX2_LATENT_CHANNELS * 4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=hidden // 2,
        num_attention_heads=2,
        joint_attention_dim=3 * MISTRAL_HIDDEN,
        axes_dims_rope=(hidden // 8,) * 4,
        guidance_embeds=guidance_embeds,
    ).eval()


def flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2 [dev]'s scheduler config (Flux2Pipeline computes the resolution-dependent shift mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def build_tiny_flux2(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random FLUX.2 [dev]-shaped pipeline (``Flux2Pipeline``) to ``out_dir``.

    Like FLUX.1's :func:`flowtune.families.flux.tiny.build_tiny_flux`: loads with
    ``Flux2Pipeline.from_pretrained``, weights depend only on ``seed``, the caller's RNG is
    untouched.  The tokenizer is saved as a plain tokenizer with its chat template (FLUX.2 [dev]
    ships a PixtralProcessor, which needs torchvision to load; flowtune loads only its tokenizer
    either way).
    """
    from diffusers import Flux2Pipeline

    tokenizer = _mistral_tokenizer()
    components = seeded_components(
        seed,
        {
            "text_encoder": lambda: _mistral3_text_encoder(tokenizer),
            "vae": tiny_flux2_vae,
            "transformer": tiny_flux2_transformer,
        },
    )
    pipe = Flux2Pipeline(scheduler=flux2_scheduler(), tokenizer=tokenizer, **components)
    pipe.save_pretrained(out_dir, safe_serialization=True)
