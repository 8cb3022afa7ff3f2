"""Qwen-Image adapter: Qwen2.5-VL text embeddings with their mask, 2x2-packed latents, image
shapes for the transformer's 3-axis RoPE."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from flowtune.flow_matching.adapters.base import (
    ExampleSize,
    FlowMatchingContext,
    ModelAdapter,
    batched,
)


class QwenImageAdapter(ModelAdapter):
    """Model adapter for Qwen-Image (and fine-tunes) in diffusers' layout.

    Batch keys (as written by ``flowtune preprocess``):
        image_latents: [B, 16, H, W] normalised VAE latents (H = pixels / 8), the VAE's frame axis
            dropped (Qwen-Image's VAE is a video VAE; an image is one frame).
        text_embeddings: [B, L, D] Qwen2.5-VL last hidden states after the prompt template
            (D = 3584 for Qwen-Image), zero-padded; [L, D] accepted for B = 1.
        text_embeddings_mask (optional): [B, L] bool, True on real tokens (the loader's mask of
            the unpadded cached embeddings); absent = every position is real.

    Transformer call (``QwenImageTransformer2DModel.forward``, diffusers 0.42):
        hidden_states: [B, (H/2)*(W/2), 64] latents packed in 2x2 patches, as
            ``QwenImagePipeline._pack_latents``.
        encoder_hidden_states: [B, L, D] text embeddings, with per-sample classifier-free-guidance
            dropout applied (the dropped samples' rows are zero; their mask is kept).
        encoder_hidden_states_mask: [B, L] bool when some position is padding, else None, as the
            pipeline passes ``prompt_embeds_mask`` (``encode_prompt`` drops an all-ones mask).
            The transformer attends to no padded text token and counts text RoPE positions over
            the whole padded length, as at sampling.
        timestep: ``timesteps / 1000`` ([B], sigma in [0, 1]), as the pipeline passes ``t / 1000``.
        img_shapes: ``[[(1, H/2, W/2)]] * B``: one frame of H/2 x W/2 tokens per sample.
        guidance: None, or [B] filled with ``guidance_scale`` with ``use_guidance_embeds``
            (no released Qwen-Image model is guidance-distilled; diffusers' transformer takes none).

    Args:
        guidance_scale: Guidance value for guidance-distilled models (``use_guidance_embeds``).
        use_guidance_embeds: Pass ``guidance`` to the transformer (the reference's default, off).
    """

    def __init__(self, guidance_scale: float = 3.5, use_guidance_embeds: bool = False):
        self.guidance_scale = guidance_scale
        self.use_guidance_embeds = use_guidance_embeds

    def example_shapes(self, config: dict[str, Any], size: ExampleSize) -> dict[str, tuple[int, ...]]:
        """``image_latents`` [B, in_channels / 4, H / 8, W / 8], ``text_embeddings``
        [B, L, joint_attention_dim] (Qwen2.5-VL), every text position real (no mask)."""
        b = size.batch_size
        return {
            "image_latents": (b, int(config.get("in_channels", 64)) // 4, size.height // 8, size.width // 8),
            "text_embeddings": (b, size.text_tokens, int(config.get("joint_attention_dim", 3584))),
        }

    @staticmethod
    def _pack_latents(latents: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/2)*(W/2), C*4]: 2x2 patches in row-major order, each patch's
        features channel-major (c, dy, dx), as ``QwenImagePipeline._pack_latents``."""
        b, c, h, w = latents.shape
        latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return latents.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def _unpack_latents(
        latents: torch.Tensor, height: int, width: int, vae_scale_factor: int = 8
    ) -> torch.Tensor:
        """[B, (h/2)*(w/2), C*4] -> [B, C, h, w], the inverse of :meth:`_pack_latents`; ``height``
        and ``width`` in pixels (h = 2 * (height // (2 * vae_scale_factor))), as in the reference
        and ``QwenImagePipeline._unpack_latents`` (which keeps the frame axis)."""
        b, tokens, channels = latents.shape
        h, w = 2 * (int(height) // (vae_scale_factor * 2)), 2 * (int(width) // (vae_scale_factor * 2))
        if tokens != (h // 2) * (w // 2):
            raise ValueError(f"cannot unpack {tokens} tokens into a {h // 2}x{w // 2} grid of 2x2 patches")
        latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return latents.reshape(b, channels // 4, h, w)

    @staticmethod
    def _text_mask(
        batch: dict[str, Any], batch_size: int, length: int, device: torch.device
    ) -> torch.Tensor | None:
        """The transformer's ``encoder_hidden_states_mask``: the batch's ``text_embeddings_mask``
        [B, L] bool, or None when it has none: the loader masks only padded batches, so one without
        padding runs the attention without a mask, as the pipeline does (fused attention kernels
        take no mask), and nothing is read back from the device to decide it."""
        mask = batch.get("text_embeddings_mask")
        if mask is None:
            return None
        mask = batched(mask, 2, "text_embeddings_mask", batch_size)
        if mask.shape[1] != length:
            raise ValueError(f"text_embeddings_mask has {mask.shape[1]} positions, text_embeddings {length}")
        return mask.to(device, dtype=torch.bool)

    def prepare_inputs(self, context: FlowMatchingContext) -> dict[str, Any]:
        """Build the QwenImageTransformer2DModel inputs from latents [B, 16, H, W].

        Caption dropout: the pipeline's ``cfg_dropout_mask``, else ``cfg_dropout_prob`` per
        sample (an adapter called directly).
        """
        context = self.step_context(context, 4, "latents [B, C, H, W]")
        latents = context.noisy_latents
        batch, device, dtype = context.batch, context.device, context.dtype
        b, c, h, w = latents.shape
        text = self.text_embeddings(context)
        guidance = None
        if self.use_guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=device, dtype=dtype)
        return {
            "hidden_states": self._pack_latents(latents),
            "encoder_hidden_states": self.apply_cfg_dropout(text, context),
            "encoder_hidden_states_mask": self._text_mask(batch, b, text.shape[1], device),
            "timestep": context.timesteps.to(device, dtype=dtype) / 1000,
            "img_shapes": [[(1, h // 2, w // 2)]] * b,
            "guidance": guidance,
            "latent_size": (h, w),
        }

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Run the transformer; returns the prediction [B, 16, H, W], in the space of the stored
        latents, so the loss against (noise - latents) is element-wise."""
        inputs = dict(inputs)
        h, w = inputs.pop("latent_size")
        pred = self.post_process_prediction(model(**inputs, return_dict=False))
        return self._unpack_latents(pred, h * 8, w * 8)
