"""FLUX.2 adapter: Mistral3 text embeddings, patchified BN-normalized latents, 4-axis RoPE ids."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from flowtune.families.flux.adapter import GuidedAdapter
from flowtune.flow_matching.adapters.base import (
    ExampleSize,
    FlowMatchingContext,
    control_keys,
)

REFERENCE_TIME_STEP = 10
"""Reference image k gets the time coordinate ``10 + 10 k`` (Flux2Pipeline's ``_prepare_image_ids``);
the generated image has 0."""


class Flux2Adapter(GuidedAdapter):
    """Model adapter for FLUX.2 ([dev] and fine-tunes) in diffusers' layout.

    The preprocessor stores latents already patchified (each 2x2 latent patch becomes 4x the
    channels) and normalized with the VAE's batch-norm running statistics, exactly as
    ``Flux2Pipeline`` prepares them, so noise is added in that space and this adapter only
    flattens the spatial grid into tokens before the transformer call and restores it after.

    Batch keys (as written by ``flowtune preprocess``):
        image_latents: [B, 128, H_p, W_p] patchified + BN-normalized latents (H_p = pixels / 16).
        text_embeddings: [B, L, D] Mistral3 hidden states 10, 20 and 30 concatenated per token
            (D = 3 x 5120 = 15360 for FLUX.2 [dev]); [L, D] accepted for B = 1.
        control_latents_0, control_latents_1, ... (optional, image editing): [B, 128, h_k, w_k]
            reference latents in the same space; sizes may differ from the target's.

    Transformer call (``Flux2Transformer2DModel.forward``):
        hidden_states: [B, H_p*W_p, 128] noisy target tokens, followed by the clean reference
            tokens when there are references.
        encoder_hidden_states: [B, L, D] text embeddings, with per-sample classifier-free-guidance
            dropout applied.
        timestep: sigma in [0, 1] ([B]); the transformer scales it by 1000, as Flux2Pipeline
            passes ``t / 1000``.
        img_ids: [B, N, 4] long rows (T, h, w, L): (0, h, w, 0) for the target, (10 + 10k, h, w, 0)
            for reference k, as Flux2Pipeline builds them.
        txt_ids: [B, L, 4] long rows (0, 0, 0, position).
        guidance: [B] filled with ``guidance_scale``, only for transformers with guidance
            embeddings (FLUX.2 [dev]) and ``use_guidance_embeds``.

    Args: those of :class:`~flowtune.families.flux.adapter.GuidedAdapter`.
    """

    def example_shapes(self, config: dict[str, Any], size: ExampleSize) -> dict[str, tuple[int, ...]]:
        """``image_latents`` [B, in_channels, H / 16, W / 16] (patchified latents),
        ``text_embeddings`` [B, L, joint_attention_dim] (Mistral3)."""
        b = size.batch_size
        return {
            "image_latents": (b, int(config.get("in_channels", 128)), size.height // 16, size.width // 16),
            "text_embeddings": (b, size.text_tokens, int(config.get("joint_attention_dim", 15360))),
        }

    @staticmethod
    def _pack_latents(latents: torch.Tensor) -> torch.Tensor:
        """Flatten spatial dims: [B, C, H, W] -> [B, H*W, C], row-major over the grid."""
        b, c, h, w = latents.shape
        return latents.reshape(b, c, h * w).permute(0, 2, 1)

    @staticmethod
    def _prepare_latent_ids(h_p: int, w_p: int, batch_size: int, device: torch.device) -> torch.Tensor:
        """4D image position ids with coords (T=0, h, w, L=0).

        Returns:
            [B, H_p*W_p, 4] long tensor, rows in the token order of :meth:`_pack_latents`.
        """
        ids = torch.zeros(h_p, w_p, 4, dtype=torch.long, device=device)
        ids[..., 1] = torch.arange(h_p, device=device)[:, None]
        ids[..., 2] = torch.arange(w_p, device=device)[None, :]
        return ids.reshape(1, h_p * w_p, 4).expand(batch_size, -1, -1)

    @staticmethod
    def _prepare_text_ids(seq_len: int, batch_size: int, device: torch.device) -> torch.Tensor:
        """4D text position ids with coords (T=0, H=0, W=0, position).

        Returns:
            [B, seq_len, 4] long tensor.
        """
        ids = torch.zeros(seq_len, 4, dtype=torch.long, device=device)
        ids[:, 3] = torch.arange(seq_len, device=device)
        return ids.unsqueeze(0).expand(batch_size, -1, -1)

    @staticmethod
    def _unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Restore spatial dims: [B, h*w, C] -> [B, C, h, w], the inverse of :meth:`_pack_latents`."""
        b, seq, c = latents.shape
        if seq != h * w:
            raise ValueError(f"cannot unpack {seq} tokens into a {h}x{w} grid")
        return latents.permute(0, 2, 1).reshape(b, c, h, w)

    def _reference_tokens(
        self, batch: dict[str, Any], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The references' tokens [B, N_ref, C] and ids [B, N_ref, 4], or None without references."""
        keys = control_keys(batch)
        if not keys:
            return None
        tokens, ids = [], []
        for position, key in enumerate(keys):
            latents = batch[key].to(device, dtype=dtype)
            b, _, h, w = latents.shape
            ref_ids = self._prepare_latent_ids(h, w, b, device).clone()
            ref_ids[..., 0] = REFERENCE_TIME_STEP * (position + 1)
            tokens.append(self._pack_latents(latents))
            ids.append(ref_ids)
        return torch.cat(tokens, dim=1), torch.cat(ids, dim=1)

    def prepare_inputs(self, context: FlowMatchingContext) -> dict[str, Any]:
        """Build the Flux2Transformer2DModel inputs from patchified latents [B, 128, H_p, W_p].

        Caption dropout: the pipeline's ``cfg_dropout_mask``, else ``cfg_dropout_prob`` per
        sample (an adapter called directly).
        """
        context = self.step_context(context, 4, "patchified latents [B, C, H_p, W_p]")
        latents = context.noisy_latents
        batch, device, dtype = context.batch, context.device, context.dtype
        b, _, h, w = latents.shape
        text = self.text_embeddings(context)
        hidden_states = self._pack_latents(latents)
        img_ids = self._prepare_latent_ids(h, w, b, device)
        inputs: dict[str, Any] = {
            "hidden_states": hidden_states,
            "encoder_hidden_states": self.apply_cfg_dropout(text, context),
            "timestep": context.sigma.to(device, dtype=dtype),
            "img_ids": img_ids,
            "txt_ids": self._prepare_text_ids(text.shape[1], b, device),
            "guidance": self.guidance_input(b, device),
            "latent_size": (h, w),
        }
        references = self._reference_tokens(batch, device, dtype)
        if references is not None:
            tokens, ids = references
            inputs["hidden_states"] = torch.cat([hidden_states, tokens], dim=1)
            inputs["img_ids"] = torch.cat([img_ids, ids], dim=1)
            inputs["target_tokens"] = hidden_states.shape[1]
        return inputs

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Run the transformer; returns the prediction [B, 128, H_p, W_p], in the space of the
        stored patchified latents, so the loss against (noise - latents) is element-wise.

        Reference tokens (``inputs["target_tokens"]`` set) are cut off the output: only the
        target's tokens are predicted.
        """
        inputs = dict(inputs)
        h, w = inputs.pop("latent_size")
        target_tokens = inputs.pop("target_tokens", None)
        guidance = self.model_guidance(model, inputs.pop("guidance"))
        pred = self.post_process_prediction(model(**inputs, guidance=guidance, return_dict=False))
        if target_tokens is not None:
            pred = pred[:, :target_tokens]
        return self._unpack_latents(pred, h, w)
