"""HunyuanVideo 1.5 adapter: video latents with their condition latents and mask channel, two
masked text streams (Qwen2.5-VL, ByT5) and SigLIP image embeddings (image-to-video)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from flowtune.flow_matching.adapters.base import (
    ExampleSize,
    FlowMatchingContext,
    ModelAdapter,
    batched,
    unwrap_model,
)

# SigLIP-so400m-patch14-384's tokens: the zero image embeddings the text-to-video pipeline passes
# (its vision_num_semantic_tokens).
IMAGE_TOKENS = 729


def one_position_at_least(embeddings: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [B, 0, D] and mask [B, 0] (ByT5 for captions without quoted text) as one
    masked zero position, [B, 1, D] and [B, 1]: the pipelines cannot take 0 positions (their
    ``encode_prompt`` reshapes with -1), and a masked ByT5 token is zeroed and attended to by
    nothing, as the pipelines' 256 masked ones; other shapes unchanged."""
    if embeddings.shape[1] > 0:
        return embeddings, mask
    b, _, d = embeddings.shape
    return embeddings.new_zeros(b, 1, d), mask.new_zeros(b, 1)


class HunyuanVideoAdapter(ModelAdapter):
    """Model adapter for HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``, diffusers 0.42).

    Batch keys (as written by ``flowtune preprocess``):
        video_latents: [B, C, F, H, W] scaled VAE latents (C = 32, H = pixels / 16, F = 1 for
            still images, which the cache stores as one-frame clips).
        text_embeddings: [B, L, 3584] Qwen2.5-VL embeddings, zero-padded; [L, D] for B = 1.
        text_embeddings_mask (optional): [B, L] bool, True on real tokens; absent = all real.
        text_embeddings_2: [B, L2, 1472] ByT5 glyph-text embeddings (L2 may be 0: no quoted
            text in the batch's captions; then one masked zero position is passed, as the
            validation pipeline is given, :func:`one_position_at_least`).
        text_embeddings_2_mask (optional): as ``text_embeddings_mask``.
        image_embeds (optional): [B, N, D] SigLIP embeddings of each clip's first frame (cached
            from image-to-video model folders).

    Transformer call (``HunyuanVideo15Transformer3DModel.forward``):
        hidden_states: [B, 2C + 1, F, H, W]: the noisy latents, the condition latents, the mask
            channel.  A sample trained image-to-video (``context.i2v_mask``, or every sample when
            ``task_type`` is "i2v" without one) has its clean first latent frame as the
            condition's first frame and the mask 1 on that frame, as
            ``HunyuanVideo15ImageToVideoPipeline.prepare_cond_latents_and_mask`` builds them from
            its image; the other samples zeros, as ``HunyuanVideo15Pipeline``'s.
        timestep: [B] ``timesteps`` (t = 1000 sigma), as the pipelines pass ``t``.
        encoder_hidden_states / encoder_attention_mask: Qwen2.5-VL embeddings with caption
            dropout applied (dropped samples' rows zero, their masks kept), the mask [B, L] in the
            compute dtype as the pipelines pass ``prompt_embeds_mask``.
        encoder_hidden_states_2 / encoder_attention_mask_2: the same for ByT5.
        image_embeds: [B, N, D]: the image-to-video samples' ``image_embeds``, zeros for the
            others; zeros [B, 729, image_embed_dim] when the batch has none, as the
            text-to-video pipeline passes (``prepare_inputs`` leaves None, ``forward`` fills
            them in with the model's width).  The transformer masks the image tokens out only
            when the whole batch's embeddings are zero, so in a batch mixing image-to-video and
            text-to-video samples the latter attend to their zero image tokens.

    Args:
        use_condition_latents: Build the condition latents and mask channel (the reference's
            option; off only for a transformer taking the noisy latents alone).
    """

    def __init__(self, use_condition_latents: bool = True):
        self.use_condition_latents = use_condition_latents

    def example_shapes(self, config: dict[str, Any], size: ExampleSize) -> dict[str, tuple[int, ...]]:
        """``video_latents`` [B, out_channels, F', H / 16, W / 16] (F' from ``size.frames``),
        ``text_embeddings`` [B, L, text_embed_dim], ``text_embeddings_2`` [B, 0, text_embed_2_dim]
        (a caption without quoted text), every text position real (no mask)."""
        b = size.batch_size
        frames = (size.frames - 1) // 4 + 1
        channels = int(config.get("out_channels", 32))
        return {
            "video_latents": (b, channels, frames, size.height // 16, size.width // 16),
            "text_embeddings": (b, size.text_tokens, int(config.get("text_embed_dim", 3584))),
            "text_embeddings_2": (b, 0, int(config.get("text_embed_2_dim", 1472))),
        }

    @staticmethod
    def _mask(
        batch: dict[str, Any], key: str, b: int, length: int, context: FlowMatchingContext
    ) -> torch.Tensor:
        """The batch's ``<key>_mask`` [B, L] in the compute dtype, all ones when absent."""
        mask = batch.get(f"{key}_mask")
        if mask is None:
            return torch.ones(b, length, device=context.device, dtype=context.dtype)
        mask = batched(mask, 2, f"{key}_mask", b)
        if mask.shape[1] != length:
            raise ValueError(f"{key}_mask has {mask.shape[1]} positions, {key} {length}")
        return mask.to(context.device, dtype=context.dtype)

    def condition(self, context: FlowMatchingContext, i2v: torch.Tensor) -> torch.Tensor:
        """[B, C + 1, F, H, W]: condition latents and mask channel; for the ``i2v`` samples the
        clean first latent frame and a mask of 1 on frame 0, zeros elsewhere."""
        clean = context.latents.to(context.device, dtype=context.dtype)
        b, c, f, h, w = clean.shape
        cond = torch.zeros(b, c + 1, f, h, w, device=context.device, dtype=context.dtype)
        keep = i2v.to(context.dtype).view(b, 1, 1, 1)
        cond[:, :c, 0] = clean[:, :, 0] * keep
        cond[:, c, 0] = keep[:, 0]
        return cond

    def prepare_inputs(self, context: FlowMatchingContext) -> dict[str, Any]:
        """Build the HunyuanVideo15Transformer3DModel inputs from latents [B, C, F, H, W].

        Caption dropout: the pipeline's ``cfg_dropout_mask``, else ``cfg_dropout_prob`` per
        sample (an adapter called directly); it zeroes both text streams of a dropped sample.
        """
        context = self.step_context(context, 5, "video latents [B, C, F, H, W]")
        batch, device, dtype = context.batch, context.device, context.dtype
        latents = context.noisy_latents.to(device, dtype=dtype)
        b = latents.shape[0]

        text = self.text_embeddings(context)
        text_2 = self.text_embeddings(context, "text_embeddings_2")
        i2v = self.i2v_samples(context)
        image = None  # forward passes zeros, the transformer's image_embed_dim wide
        if "image_embeds" in batch:
            image = batched(batch["image_embeds"], 3, "image_embeds", b).to(device, dtype=dtype)
            image = image * i2v.to(dtype).view(b, 1, 1)

        hidden = latents
        if self.use_condition_latents:
            hidden = torch.cat([latents, self.condition(context, i2v)], dim=1)
        mask_2 = self._mask(batch, "text_embeddings_2", b, text_2.shape[1], context)
        text_2, mask_2 = one_position_at_least(text_2, mask_2)
        return {
            "hidden_states": hidden,
            "timestep": context.timesteps.to(device, dtype=dtype),
            "encoder_hidden_states": self.apply_cfg_dropout(text, context),
            "encoder_attention_mask": self._mask(batch, "text_embeddings", b, text.shape[1], context),
            "encoder_hidden_states_2": self.apply_cfg_dropout(text_2, context),
            "encoder_attention_mask_2": mask_2,
            "image_embeds": image,
        }

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Run the transformer (``image_embeds`` None: zeros [B, 729, image_embed_dim], as the
        text-to-video pipeline passes); returns the velocity prediction [B, C, F, H, W], in the
        space of the stored latents."""
        inputs = dict(inputs)
        if inputs.get("image_embeds") is None:
            hidden = inputs["hidden_states"]
            width = int(unwrap_model(model).config.image_embed_dim)
            inputs["image_embeds"] = hidden.new_zeros(hidden.shape[0], IMAGE_TOKENS, width)
        return self.post_process_prediction(model(**inputs, return_dict=False))
