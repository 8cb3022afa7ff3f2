"""Wan 2.1 T2V's tiny random pipeline (``flowtune make-tiny wan``): Wan 2.1's components and
geometry at minimal widths and depths (see :mod:`flowtune.tiny`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flowtune.tiny import CAPTION_WORDS, seeded_components, t5_encoder_config, unigram_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import T5TokenizerFast, UMT5EncoderModel

# Sizes of the tiny Wan components.  Wan 2.1's geometry is kept: a causal 3D VAE with 16 latent
# channels that downsamples by 8 in space and 4 in time (the first frame alone), per-channel latent
# statistics in its config, 1x2x2 patches (a token holds 16 x 2 x 2 = 64 latent features), RoPE
# over (frame, height, width), and a UMT5 encoder whose last hidden state, zero-padded to
# max_sequence_length, is the text input.
UMT5_D_MODEL = 32  # the transformer's text_dim
UMT5_MAX_LENGTH = 512  # WanPipeline's default max_sequence_length
LATENT_CHANNELS = 16
TRANSFORMER_HEADS = 2
TRANSFORMER_HEAD_DIM = 32  # 2 x 32 = 64 wide: a latent token's 64 features
# Wan 2.1's flow shift for 480p sampling (its UniPC scheduler config; 5.0 for 720p).
FLOW_SHIFT = 3.0


def umt5_tokenizer() -> T5TokenizerFast:
    """A UMT5-style Unigram tokenizer over a small fixed vocabulary, the caption words and the
    synthetic datasets' (ids 0/1/2 = pad/eos/unk as in T5 and UMT5), appending ``</s>`` to every
    text as the real one does."""
    from tokenizers import processors
    from transformers import T5TokenizerFast

    from flowtune.data.synthetic import COLOURS, SHAPES, SIZES

    backend = unigram_tokenizer([*CAPTION_WORDS, *SHAPES, *COLOURS, *SIZES, "background"])
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=UMT5_MAX_LENGTH)


def umt5_encoder(tokenizer: T5TokenizerFast) -> UMT5EncoderModel:
    """A 2-layer UMT5 encoder (gated GELU, per-layer relative attention bias, as umt5-xxl) of
    width 32, sized to ``tokenizer``."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = t5_encoder_config(UMT5Config, tokenizer, UMT5_D_MODEL)
    return UMT5EncoderModel(config).eval()


def tiny_wan_vae() -> AutoencoderKLWan:
    """Wan 2.1's VAE layout (4 levels downsampling by 8, the last two also by 2 in time; 16 latent
    channels) at 8 channels wide, its ``latents_mean`` / ``latents_std`` those of its own latents
    of synthetic shape images, as Wan's are of its latents (see the Qwen-Image tiny VAE, whose
    layout is Wan's)."""
    from diffusers import AutoencoderKLWan

    from flowtune.families.qwen_image.tiny import _latent_statistics

    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    mean, std = _latent_statistics(vae)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return vae


def tiny_wan_transformer() -> WanTransformer3DModel:
    """A Wan 2.1-shaped transformer: 2 blocks of self-attention, cross-attention to the text and a
    GELU feed-forward, 64 wide in 2 heads of 32 (RoPE: 12 frame / 10 height / 10 width dims, as
    diffusers splits a head), 1x2x2 patches of 16-channel latents, text width 32.

    Takes latents [B, 16, F', h, w] and UMT5 embeddings [B, L, 32]; random weights from torch's
    global RNG.
    """
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=TRANSFORMER_HEADS,
        attention_head_dim=TRANSFORMER_HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=UMT5_D_MODEL,
        freq_dim=32,
        ffn_dim=2 * TRANSFORMER_HEADS * TRANSFORMER_HEAD_DIM,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    ).eval()
    _open_gates(transformer)
    return transformer


@torch.no_grad()
def _open_gates(transformer: WanTransformer3DModel) -> None:
    """Set every block's residual gates (the 3rd and 6th rows of its ``scale_shift_table``:
    shift, scale, gate for self-attention, then for the feed-forward) to 1.

    A random block's gates are the table's random rows (about 0.1 here) plus a small timestep
    projection, which mutes its self-attention and feed-forward branches, so LoRAs on those
    hardly move the output; a trained Wan's branches do contribute (as the Qwen-Image tiny
    model's, :func:`flowtune.families.qwen_image.tiny._open_gates`).
    """
    for block in transformer.blocks:
        block.scale_shift_table[:, 2] = 1.0
        block.scale_shift_table[:, 5] = 1.0


def wan_scheduler() -> UniPCMultistepScheduler:
    """Wan 2.1's scheduler config as its diffusers repositories ship it: UniPC (2nd order, bh2)
    over flow-matching sigmas shifted by :data:`FLOW_SHIFT`."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=FLOW_SHIFT,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
    )


def tiny_wan_components(seed: int) -> dict:
    """The tiny pipeline's components (``scheduler``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``transformer``), each seeded by ``seed`` and its name; the caller's RNG is untouched."""
    tokenizer = umt5_tokenizer()
    components = seeded_components(
        seed,
        {
            "text_encoder": lambda: umt5_encoder(tokenizer),
            "vae": tiny_wan_vae,
            "transformer": tiny_wan_transformer,
        },
    )
    return {"scheduler": wan_scheduler(), "tokenizer": tokenizer, **components}


def build_tiny_wan(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random Wan 2.1 T2V-shaped pipeline (``WanPipeline``) to ``out_dir``.

    Like FLUX.1's :func:`flowtune.families.flux.tiny.build_tiny_flux`: loads with
    ``WanPipeline.from_pretrained``, weights depend only on ``seed``, the caller's RNG is
    untouched.
    """
    from diffusers import WanPipeline

    with torch.no_grad():
        WanPipeline(**tiny_wan_components(seed)).save_pretrained(out_dir, safe_serialization=True)
