"""HunyuanVideo 1.5's tiny random pipeline (``flowtune make-tiny hunyuan-video``): its components
and geometry at minimal widths and depths (see :mod:`flowtune.tiny`).

Kept from the real model: the causal 3D VAE compressing 16x in space and 4x in time (a clip of
``4n + 1`` frames gives ``n + 1`` latent frames, the first frame encoded alone), latents scaled
by the VAE config's ``scaling_factor``; a transformer on 1x1x1 patches whose input is the noisy
latents, the condition latents and a mask channel (``2C + 1`` channels); the Qwen2.5-VL text
encoder read at its third-to-last hidden state after the pipeline's 108-token system prompt; the
ByT5 glyph encoder; the classifier-free guider; a shifted flow-matching scheduler.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowtune.tiny import qwen3_tokenizer, seeded_components

if TYPE_CHECKING:
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from transformers import Qwen2_5_VLTextModel, Qwen2Tokenizer, SiglipVisionModel, T5EncoderModel

LATENT_CHANNELS = 8  # the real VAE's 32, scaled down
TEXT_HIDDEN = 32  # Qwen2.5-VL's width (3584 for the 7B) = the transformer's text_embed_dim
BYT5_HIDDEN = 24  # ByT5's d_model (1472 for Glyph-SDXL-v2's) = text_embed_2_dim
VISION_HIDDEN = 16  # SigLIP's width (1152) = image_embed_dim
# 2 heads of 32: a token's 2C + 1 = 17 input features fit, RoPE (frame, height, width) over
# 4 + 14 + 14 of each head's 32 features (the real 16:56:56 of 128).
HEADS, HEAD_DIM, ROPE_AXES = 2, 32, (4, 14, 14)
TARGET_SIZE = 64  # the pipelines' default video area, sqrt(pixels) (640 for the 480p models)
SIGLIP_SIZE, SIGLIP_PATCH = 28, 14  # 2 x 2 = 4 image tokens (SigLIP-so400m: 27 x 27 = 729)


def system_message() -> str:
    """``HunyuanVideo15Pipeline``'s system prompt (its ``_get_mllm_prompt_embeds`` default)."""
    from diffusers import HunyuanVideo15Pipeline

    signature = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds)
    return signature.parameters["system_message"].default


def hunyuan_tokenizer() -> Qwen2Tokenizer:
    """The tiny Qwen2 tokenizer (:func:`flowtune.tiny.qwen3_tokenizer`, whose chat template
    renders string messages as Qwen2.5-VL's does) trained on the pipeline's system prompt too, so
    that every word and punctuation run of it is one token as in Qwen's vocabulary: the prompt
    before the user's text is then 108 tokens, the pipeline's ``prompt_template_encode_start_idx``,
    and the tokens the pipeline crops are exactly the template's."""
    return qwen3_tokenizer([system_message()], max_length=32768)


def hunyuan_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLTextModel:
    """A Qwen2.5-VL text model: 3 layers of width 32 (the pipeline reads the third-to-last
    hidden state, the first layer's output), multimodal RoPE over 3 sections."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=3,
        max_window_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=tokenizer.pad_token_id,  # Qwen2.5-VL's: <|endoftext|>
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2_5_VLTextModel(config).eval()


def byt5_encoder() -> T5EncoderModel:
    """A ByT5 encoder (T5 over ByT5's 384 byte ids): one layer of width 24."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=384, d_model=BYT5_HIDDEN, d_kv=12, d_ff=48, num_layers=1, num_heads=2,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def hunyuan_vae() -> AutoencoderKLHunyuanVideo15:
    """HunyuanVideo 1.5's VAE layout (5 levels, 16x spatial and 4x temporal compression) at 16
    channels and 8 latent channels; the real ``scaling_factor`` (its latents are about unit
    scale with it)."""
    from diffusers import AutoencoderKLHunyuanVideo15

    return AutoencoderKLHunyuanVideo15(
        latent_channels=LATENT_CHANNELS, block_out_channels=(16,) * 5, layers_per_block=1
    ).eval()


def tiny_hunyuan_transformer() -> HunyuanVideo15Transformer3DModel:
    """A HunyuanVideo 1.5-shaped transformer: 2 double-stream blocks of width 64 (2 heads of 32),
    one token-refiner block, 1x1x1 patches of ``2C + 1`` = 17 channels, ``C`` out."""
    from diffusers import HunyuanVideo15Transformer3DModel

    return HunyuanVideo15Transformer3DModel(
        in_channels=2 * LATENT_CHANNELS + 1,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=2,
        num_refiner_layers=1,
        text_embed_dim=TEXT_HIDDEN,
        text_embed_2_dim=BYT5_HIDDEN,
        image_embed_dim=VISION_HIDDEN,
        rope_axes_dim=ROPE_AXES,
        target_size=TARGET_SIZE,
        task_type="t2v",
    ).eval()


def tiny_hunyuan_components(seed: int) -> dict[str, Any]:
    """The text-to-video pipeline's components, each seeded by ``seed`` and its name (the
    caller's RNG untouched): the scheduler (shift 5, the 480p models'), the guider (CFG 6.0)."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler
    from transformers import ByT5Tokenizer

    tokenizer = hunyuan_tokenizer()
    built = seeded_components(
        seed,
        {
            "text_encoder": lambda: hunyuan_text_encoder(tokenizer),
            "text_encoder_2": byt5_encoder,
            "vae": hunyuan_vae,
            "transformer": tiny_hunyuan_transformer,
        },
    )
    return {
        **built,
        "tokenizer": tokenizer,
        "tokenizer_2": ByT5Tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
        "guider": ClassifierFreeGuidance(guidance_scale=6.0),
    }


def siglip_components(seed: int) -> dict[str, Any]:
    """The image-to-video pipeline's extra components: a 1-layer SigLIP vision tower of width 16
    on 28-pixel images (4 tokens) and its image processor (the PIL one: no torchvision)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    def image_encoder() -> SiglipVisionModel:
        config = SiglipVisionConfig(
            hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=1,
            num_attention_heads=2, image_size=SIGLIP_SIZE, patch_size=SIGLIP_PATCH,
        )  # fmt: skip
        return SiglipVisionModel(config).eval()

    return {
        **seeded_components(seed, {"image_encoder": image_encoder}),
        "feature_extractor": SiglipImageProcessorPil(size={"height": SIGLIP_SIZE, "width": SIGLIP_SIZE}),
    }


def build_tiny_hunyuan_video(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random HunyuanVideo 1.5 text-to-video pipeline (``HunyuanVideo15Pipeline``)
    to ``out_dir``; weights depend only on ``seed``, the caller's RNG is untouched."""
    from diffusers import HunyuanVideo15Pipeline

    HunyuanVideo15Pipeline(**tiny_hunyuan_components(seed)).save_pretrained(out_dir, safe_serialization=True)


def build_tiny_hunyuan_video_i2v(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random HunyuanVideo 1.5 image-to-video pipeline
    (``HunyuanVideo15ImageToVideoPipeline``: the text-to-video components, the transformer's
    ``task_type`` "i2v", and a SigLIP image encoder) to ``out_dir``."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    components = {**tiny_hunyuan_components(seed), **siglip_components(seed)}
    components["transformer"].register_to_config(task_type="i2v")
    pipe = HunyuanVideo15ImageToVideoPipeline(**components)
    pipe.save_pretrained(out_dir, safe_serialization=True)
