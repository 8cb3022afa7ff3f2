"""FLUX.1 adapter: T5 sequence + CLIP pooled conditioning, 2x2-packed latents, 3-axis RoPE ids."""

from __future__ import annotations

import logging
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

logger = logging.getLogger(__name__)

POOLED_KEYS = ("pooled_prompt_embeds", "clip_pooled")
"""Batch keys of the CLIP pooled embedding, in order of preference (the reference reads both)."""

CLIP_POOLED_DIM = 768
"""Width of the zero pooled embedding given when a batch has none (CLIP-L's, as the reference);
:meth:`FluxAdapter.forward` resizes it to the model's ``pooled_projection_dim``."""


def model_guidance(
    model: nn.Module, guidance: torch.Tensor, use_guidance_embeds: bool
) -> torch.Tensor | None:
    """The ``guidance`` argument of a FLUX (.1 or .2) transformer call.

    Args:
        model: The transformer (possibly wrapped); its ``config.guidance_embeds`` says whether it
            is guidance-distilled.
        guidance: [B] the guidance values.
        use_guidance_embeds: The adapter's setting.

    Returns:
        ``guidance`` for models with guidance embeddings, None for models without them.

    Raises:
        ValueError: the model has guidance embeddings and ``use_guidance_embeds`` is false: such a
            model cannot run without guidance.
    """
    has_guidance = bool(getattr(unwrap_model(model).config, "guidance_embeds", False))
    if has_guidance and not use_guidance_embeds:
        raise ValueError(
            "this FLUX transformer has guidance embeddings (a guidance-distilled model such as "
            "FLUX.1-dev or FLUX.2-dev) and cannot run without guidance; set use_guidance_embeds=True"
        )
    return guidance if has_guidance else None


class GuidedAdapter(ModelAdapter):
    """The FLUX adapters' guidance setting: a value given to guidance-distilled transformers.

    Args:
        guidance_scale: Guidance value fed to guidance-distilled models during training.
        use_guidance_embeds: Pass guidance to models that have guidance embeddings.  Models
            without them (FLUX.1 [schnell], FLUX.2 [klein]) never receive guidance, whatever this
            says; a model with them cannot run without guidance, so ``False`` there is an error.
    """

    def __init__(self, guidance_scale: float = 3.5, use_guidance_embeds: bool = True):
        self.guidance_scale = guidance_scale
        self.use_guidance_embeds = use_guidance_embeds

    def guidance_input(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """[B] float32 filled with ``guidance_scale``: the ``guidance`` entry of the inputs, which
        :meth:`model_guidance` keeps or drops per the model."""
        return torch.full((batch_size,), self.guidance_scale, device=device, dtype=torch.float32)

    def model_guidance(self, model: nn.Module, guidance: torch.Tensor) -> torch.Tensor | None:
        """The transformer call's ``guidance`` argument (:func:`model_guidance`)."""
        return model_guidance(model, guidance, self.use_guidance_embeds)


class FluxAdapter(GuidedAdapter):
    """Model adapter for FLUX.1 ([dev], [schnell] and fine-tunes) in diffusers' layout.

    Batch keys (as written by ``flowtune preprocess``):
        image_latents: [B, C, H, W] VAE latents, already normalized
            ((z - shift_factor) * scaling_factor); C = 16, H = W = pixels / 8 for FLUX.1.
        text_embeddings: [B, L, 4096] T5 sequence embeddings ([L, 4096] accepted for B = 1).
        pooled_prompt_embeds (or clip_pooled): [B, 768] CLIP pooled embeddings ([768] accepted
            for B = 1).  A batch with neither gets zeros (with a warning), as in the reference.

    Transformer call (``FluxTransformer2DModel.forward``):
        hidden_states: packed noisy latents [B, (H/2)*(W/2), 4C].
        encoder_hidden_states / pooled_projections: the text conditioning, with per-sample
            classifier-free-guidance dropout applied to both consistently.
        timestep: sigma in [0, 1] ([B]); the transformer scales it by 1000 itself, exactly as
            FluxPipeline passes ``t / 1000``.
        img_ids: [(H/2)*(W/2), 3] rows (0, y, x); txt_ids: [L, 3] zeros.
        guidance: [B] filled with ``guidance_scale``, only when the transformer has guidance
            embeddings (FLUX.1-dev) and ``use_guidance_embeds`` is true.

    Args: those of :class:`GuidedAdapter`.
    """

    def __init__(self, guidance_scale: float = 3.5, use_guidance_embeds: bool = True):
        super().__init__(guidance_scale, use_guidance_embeds)
        self._warned_no_pooled = False

    def example_shapes(self, config: dict[str, Any], size: ExampleSize) -> dict[str, tuple[int, ...]]:
        """``image_latents`` [B, in_channels / 4, H / 8, W / 8] (VAE latents, packed 2x2 by the
        adapter), ``text_embeddings`` [B, L, joint_attention_dim] (T5), ``pooled_prompt_embeds``
        [B, pooled_projection_dim] (CLIP)."""
        b = size.batch_size
        return {
            "image_latents": (b, int(config.get("in_channels", 64)) // 4, size.height // 8, size.width // 8),
            "text_embeddings": (b, size.text_tokens, int(config.get("joint_attention_dim", 4096))),
            "pooled_prompt_embeds": (b, int(config.get("pooled_projection_dim", 768))),
        }

    def _pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H//2)*(W//2), C*4]: each 2x2 latent patch becomes one token.

        Token order is row-major over patches; within a token, channels vary slowest, then the
        patch row, then the patch column (diffusers' FluxPipeline._pack_latents).
        """
        b, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX latents need even height and width, got {h}x{w}")
        latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return latents.reshape(b, (h // 2) * (w // 2), c * 4)

    def _prepare_latent_image_ids(
        self, batch_size: int, height: int, width: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Position ids of the packed image tokens.

        Args:
            height, width: Latent height and width (before packing).

        Returns:
            [B, (H//2)*(W//2), 3] with rows (0, y, x), y/x the token's row/column; the first axis
            is the domain (0 for the generated image; FLUX.1 Kontext uses 1 for reference images).
        """
        h, w = height // 2, width // 2
        ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
        ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
        ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
        return ids.reshape(1, h * w, 3).expand(batch_size, -1, -1)

    @staticmethod
    def _unpack_latents(
        latents: torch.Tensor, height: int, width: int, vae_scale_factor: int = 8
    ) -> torch.Tensor:
        """[B, (H//2)*(W//2), C*4] -> [B, C, H, W], the inverse of :meth:`_pack_latents`.

        Args:
            latents: Packed tokens.
            height, width: Image size in pixels; the latent size is pixels / vae_scale_factor,
                rounded down to even (diffusers' FluxPipeline._unpack_latents).
            vae_scale_factor: VAE spatial compression (8 for FLUX.1).
        """
        b, _, channels = latents.shape
        h = 2 * (int(height) // (vae_scale_factor * 2))
        w = 2 * (int(width) // (vae_scale_factor * 2))
        latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return latents.reshape(b, channels // 4, h, w)

    def _pooled(self, batch: dict[str, Any], batch_size: int) -> torch.Tensor | None:
        """The batch's CLIP pooled embedding [B, D] (``pooled_prompt_embeds``, else
        ``clip_pooled``), or None when it has neither."""
        for key in POOLED_KEYS:
            if key in batch:
                return batched(batch[key], 2, key, batch_size)
        if not self._warned_no_pooled:
            self._warned_no_pooled = True
            logger.warning(
                "the batch has no CLIP pooled embedding (%s); FLUX.1 is given zeros instead",
                " or ".join(POOLED_KEYS),
            )
        return None

    def prepare_inputs(self, context: FlowMatchingContext) -> dict[str, Any]:
        """Build the FluxTransformer2DModel inputs from a 4D latent batch.

        Caption dropout: the pipeline's ``cfg_dropout_mask``, else ``cfg_dropout_prob`` per
        sample (an adapter called directly), applied to T5 and CLIP alike.
        """
        context = self.step_context(context, 4, "latents [B, C, H, W]")
        latents = context.noisy_latents
        batch, device, dtype = context.batch, context.device, context.dtype
        b, _, h, w = latents.shape
        text = self.text_embeddings(context)
        pooled = self._pooled(batch, b)
        pooled_missing = pooled is None
        if pooled is None:
            pooled = torch.zeros(b, CLIP_POOLED_DIM, device=device, dtype=dtype)
        pooled = pooled.to(device, dtype=dtype)
        img_ids = self._prepare_latent_image_ids(b, h, w, device, dtype)
        inputs = {
            "hidden_states": self._pack_latents(latents),
            "encoder_hidden_states": self.apply_cfg_dropout(text, context),
            "pooled_projections": self.apply_cfg_dropout(pooled, context),
            "timestep": context.sigma.to(device, dtype=dtype),
            "img_ids": img_ids[0],
            "txt_ids": torch.zeros(text.shape[1], 3, device=device, dtype=dtype),
            "guidance": self.guidance_input(b, device),
            "latent_size": (h, w),
        }
        if pooled_missing:
            inputs["pooled_missing"] = True
        return inputs

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Run the transformer; returns the velocity prediction unpacked to [B, C, H, W].

        ``inputs["target_tokens"]`` (optional, set by adapters that append other tokens such as
        FLUX.1 Kontext's reference images): only the first that many output tokens are the
        prediction of the image being generated.  ``inputs["pooled_missing"]`` (the batch had no
        pooled embedding): the zero pooled embedding is given the model's
        ``pooled_projection_dim``.
        """
        inputs = dict(inputs)
        h, w = inputs.pop("latent_size")
        target_tokens = inputs.pop("target_tokens", None)
        if inputs.pop("pooled_missing", False):
            width = getattr(unwrap_model(model).config, "pooled_projection_dim", None)
            pooled = inputs["pooled_projections"]
            if width is not None and int(width) != pooled.shape[-1]:
                inputs["pooled_projections"] = pooled.new_zeros(pooled.shape[0], int(width))
        guidance = self.model_guidance(model, inputs.pop("guidance"))
        pred = model(**inputs, guidance=guidance, return_dict=False)
        pred = self.post_process_prediction(pred)
        if target_tokens is not None:
            pred = pred[:, :target_tokens]
        return self._unpack_latents(pred, h, w, vae_scale_factor=1)
