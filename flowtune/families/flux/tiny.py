"""FLUX.1's tiny random pipeline (``flowtune make-tiny flux``; FLUX.1 Kontext's too): FLUX.1
[dev]'s components and geometry at minimal widths and depths (see :mod:`flowtune.tiny`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flowtune.tiny import (
    CAPTION_WORDS,
    TINY_VAE_LAYOUT,
    seeded_components,
    t5_encoder_config,
    unigram_tokenizer,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

# Sizes of the tiny FLUX.1 components.  Everything else (latent channels, 2x2 packing, VAE
# downsampling by 8, RoPE over three axes, guidance embedding) is FLUX.1 [dev]'s own geometry.
CLIP_HIDDEN = 32  # pooled_projection_dim of the transformer
T5_D_MODEL = 32  # joint_attention_dim of the transformer
CLIP_MAX_LENGTH = 77  # CLIP's context length, as in FLUX.1
T5_MAX_LENGTH = 512  # FLUX.1's T5 tokenizer limit (and FluxPipeline's default max_sequence_length)
LATENT_CHANNELS = 16  # FLUX.1's VAE latent channels; the transformer sees 16 x 2 x 2 = 64
# The VAE latent normalisation z -> (z - shift) * scale.  FLUX.1's values (0.3611, 0.1159) are
# what give *its* VAE's latents zero mean and unit variance; the tiny random VAE's raw latents of
# ordinary images have mean ~0.03 and std ~0.33 (measured over several seeds on the synthetic
# shapes), so these are calibrated the same way, and normalized tiny latents have unit variance
# like real ones.  With FLUX.1's numbers they would be ~8x smaller than the noise, and training
# on them would hardly see the images.
VAE_SCALING_FACTOR = 3.0
VAE_SHIFT_FACTOR = 0.03

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with no merges: every character is its own token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    # The 256 printable stand-ins of the byte-level pre-tokenizer, sorted for a stable order.
    symbols = sorted(ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols] + [CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def _clip_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer CLIP text encoder whose special-token ids match ``tokenizer``.

    The pooled output (FLUX's ``pooled_projections``) is read at the first EOS token, so the
    config's ``eos_token_id`` must be the tokenizer's.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=2 * CLIP_HIDDEN,
        projection_dim=CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _t5_tokenizer() -> T5TokenizerFast:
    """A T5 Unigram tokenizer over a small fixed vocabulary (ids 0/1/2 = pad/eos/unk, as in T5)."""
    from tokenizers import processors
    from transformers import T5TokenizerFast

    backend = unigram_tokenizer(list(CAPTION_WORDS))
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    # extra_ids=0: no T5 sentinel tokens, so len(tokenizer) is the vocabulary above.
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _t5_encoder(tokenizer: T5TokenizerFast) -> T5EncoderModel:
    """A 2-layer T5 v1.1-style encoder (gated GELU, relative attention) sized to ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    config = t5_encoder_config(T5Config, tokenizer, T5_D_MODEL)
    return T5EncoderModel(config).eval()


def tiny_flux_vae() -> AutoencoderKL:
    """FLUX.1's VAE layout (4 levels: downsampling by 8, 16 latent channels) at 8 channels wide."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        **TINY_VAE_LAYOUT,
        latent_channels=LATENT_CHANNELS,
        scaling_factor=VAE_SCALING_FACTOR,
        shift_factor=VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def tiny_flux_transformer(guidance_embeds: bool = True, hidden: int = 32) -> FluxTransformer2DModel:
    """A FLUX.1 [dev]-shaped transformer: 2 double- and 2 single-stream blocks, hidden size 32
    unless ``hidden`` says otherwise.

    Takes latents of 16 channels packed 2x2 ([B, N, 64]), T5 embeddings [B, L, 32] and CLIP
    pooled embeddings [B, 32]; random weights from torch's global RNG.  ``guidance_embeds=False``
    gives a FLUX.1 [schnell]-style model.  ``hidden`` (a multiple of 16) widens it: two heads of
    ``hidden / 2``, RoPE axes (hidden/8, 3 hidden/16, 3 hidden/16), which sum to the head size.
    """
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        out_channels=None,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=hidden // 2,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(hidden // 8, 3 * hidden // 16, 3 * hidden // 16),
    ).eval()


def _flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1 [dev]'s scheduler config (resolution-dependent timestep shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_tiny_flux(out_dir: Path, seed: int = 0, pipeline_class: str = "FluxPipeline") -> None:
    """Write a tiny random FLUX.1 [dev]-shaped pipeline to ``out_dir`` in diffusers format.

    The directory loads with ``diffusers.<pipeline_class>.from_pretrained`` and generates images
    (noise-like ones).  Weights are safetensors and depend only on ``seed``: the same seed gives
    byte-identical weight files.  The caller's global torch RNG state is left untouched.

    Args:
        out_dir: Where to write; created if missing (use :func:`make_tiny` for an atomic write).
        seed: Seed for the random weights.
        pipeline_class: ``FluxPipeline``, or ``FluxKontextPipeline`` (same components).
    """
    import diffusers

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    components = seeded_components(
        seed,
        {
            "text_encoder": lambda: _clip_text_encoder(tokenizer),
            "text_encoder_2": lambda: _t5_encoder(tokenizer_2),
            "vae": tiny_flux_vae,
            "transformer": tiny_flux_transformer,
        },
    )
    pipe = getattr(diffusers, pipeline_class)(
        scheduler=_flux_scheduler(), tokenizer=tokenizer, tokenizer_2=tokenizer_2, **components
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
