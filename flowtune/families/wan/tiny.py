"""Wan's tiny random pipelines: Wan 2.1 T2V (``flowtune make-tiny wan``), Wan 2.1 I2V
(:func:`build_tiny_wan_i2v`) and Wan 2.2 TI2V-5B (:func:`build_tiny_wan_ti2v`), their components
and geometry at minimal widths and depths (see :mod:`flowtune.tiny`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flowtune.tiny import CAPTION_WORDS, seeded_components, t5_encoder_config, unigram_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import CLIPVisionModel, T5TokenizerFast, UMT5EncoderModel

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
# Wan 2.1 I2V: the transformer takes the noisy latents, 4 mask channels (one per frame a latent
# frame packs) and the condition latents; its CLIP ViT-H/14 image encoder (1280 wide, 257 tokens
# of 224-pixel images) is here 16 wide on 28-pixel images in 14-pixel patches (5 tokens).
MASK_CHANNELS = 4
I2V_IN_CHANNELS = LATENT_CHANNELS + MASK_CHANNELS + LATENT_CHANNELS
CLIP_HIDDEN = 16
CLIP_SIZE = 28
CLIP_PATCH = 14
# Wan 2.2 TI2V-5B: the Wan 2.2 VAE's 48 latent channels, 16x spatial (a 2x2 pixel patchify around
# an 8x VAE), 4x temporal; its flow shift 5.0 (the hub model's UniPC config).
TI2V_LATENT_CHANNELS = 48
TI2V_FLOW_SHIFT = 5.0


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


def tiny_wan_ti2v_vae() -> AutoencoderKLWan:
    """The Wan 2.2 VAE's layout (residual down/up-sampling blocks around a 2x2 pixel patchify:
    12 input channels, 48 latent channels, 16x spatial and 4x temporal compression, causal in
    time) at 8 channels wide, with its own latents' statistics as :func:`tiny_wan_vae`."""
    from diffusers import AutoencoderKLWan

    from flowtune.families.qwen_image.tiny import _latent_statistics

    vae = AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=TI2V_LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        latents_mean=[0.0] * TI2V_LATENT_CHANNELS,
        latents_std=[1.0] * TI2V_LATENT_CHANNELS,
    ).eval()
    mean, std = _latent_statistics(vae)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return vae


def tiny_wan_transformer(
    in_channels: int = LATENT_CHANNELS, out_channels: int = LATENT_CHANNELS, image_dim: int | None = None
) -> WanTransformer3DModel:
    """A Wan-shaped transformer: 2 blocks of self-attention, cross-attention to the text and a
    GELU feed-forward, 64 wide in 2 heads of 32 (RoPE: 12 frame / 10 height / 10 width dims, as
    diffusers splits a head), 1x2x2 patches of ``in_channels``-channel latents, text width 32.

    Takes latents [B, in_channels, F', h, w] and UMT5 embeddings [B, L, 32] (with ``image_dim``,
    as Wan 2.1 I2V, also CLIP image tokens [B, N, image_dim] that each block's cross-attention
    attends to through its own key and value projections, ``add_k_proj`` / ``add_v_proj``); random
    weights from torch's global RNG.
    """
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=TRANSFORMER_HEADS,
        attention_head_dim=TRANSFORMER_HEAD_DIM,
        in_channels=in_channels,
        out_channels=out_channels,
        image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else TRANSFORMER_HEADS * TRANSFORMER_HEAD_DIM,
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


def wan_scheduler(flow_shift: float = FLOW_SHIFT) -> UniPCMultistepScheduler:
    """Wan's scheduler config as its diffusers repositories ship it: UniPC (2nd order, bh2)
    over flow-matching sigmas shifted by ``flow_shift``."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
    )


def tiny_wan_components(
    seed: int, transformer: Callable[[], WanTransformer3DModel] = tiny_wan_transformer
) -> dict:
    """The tiny pipeline's components (``scheduler``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``transformer``, built by ``transformer``), each seeded by ``seed`` and its name; the caller's
    RNG is untouched."""
    tokenizer = umt5_tokenizer()
    components = seeded_components(
        seed,
        {
            "text_encoder": lambda: umt5_encoder(tokenizer),
            "vae": tiny_wan_vae,
            "transformer": transformer,
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


def clip_vision_components(seed: int) -> dict:
    """Wan 2.1 I2V's image components: a 2-layer CLIP vision tower (``image_encoder``; the
    pipeline reads its second-to-last hidden state) :data:`CLIP_HIDDEN` wide on
    :data:`CLIP_SIZE`-pixel images, and its ``image_processor`` (the PIL one: no torchvision)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    def image_encoder() -> CLIPVisionModel:
        config = CLIPVisionConfig(
            hidden_size=CLIP_HIDDEN, intermediate_size=2 * CLIP_HIDDEN, num_hidden_layers=2,
            num_attention_heads=2, image_size=CLIP_SIZE, patch_size=CLIP_PATCH, projection_dim=CLIP_HIDDEN,
        )  # fmt: skip
        return CLIPVisionModel(config).eval()

    processor = CLIPImageProcessorPil(
        size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}
    )
    return {**seeded_components(seed, {"image_encoder": image_encoder}), "image_processor": processor}


def build_tiny_wan_i2v(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random Wan 2.1 I2V-shaped pipeline (``WanImageToVideoPipeline``) to
    ``out_dir``: the T2V components, a transformer taking :data:`I2V_IN_CHANNELS` (noisy latents,
    mask, condition latents) and CLIP image tokens, and the CLIP image components
    (:func:`clip_vision_components`)."""
    from diffusers import WanImageToVideoPipeline

    components = tiny_wan_components(
        seed, lambda: tiny_wan_transformer(I2V_IN_CHANNELS, LATENT_CHANNELS, CLIP_HIDDEN)
    )
    components.update(clip_vision_components(seed))
    with torch.no_grad():
        WanImageToVideoPipeline(**components).save_pretrained(out_dir, safe_serialization=True)


def build_tiny_wan_ti2v(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random Wan 2.2 TI2V-5B-shaped pipeline to ``out_dir``: ``WanPipeline`` with
    ``expand_timesteps`` (per-token timesteps, as the hub model's ``model_index.json``), the
    48-channel 16x VAE (:func:`tiny_wan_ti2v_vae`), a transformer on its latents, no image
    encoder; ``WanImageToVideoPipeline.from_pretrained`` loads it for image-to-video."""
    from diffusers import WanPipeline

    tokenizer = umt5_tokenizer()
    components = seeded_components(
        seed,
        {
            "text_encoder": lambda: umt5_encoder(tokenizer),
            "vae": tiny_wan_ti2v_vae,
            "transformer": lambda: tiny_wan_transformer(TI2V_LATENT_CHANNELS, TI2V_LATENT_CHANNELS),
        },
    )
    pipe = WanPipeline(
        scheduler=wan_scheduler(TI2V_FLOW_SHIFT), tokenizer=tokenizer, expand_timesteps=True, **components
    )
    with torch.no_grad():
        pipe.save_pretrained(out_dir, safe_serialization=True)
