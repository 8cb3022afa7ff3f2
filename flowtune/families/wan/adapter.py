"""Wan 2.1 adapter: video latents as they are, UMT5 embeddings zero-padded to the pipeline's text
length, the raw timestep."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from flowtune.families.wan import SPEC
from flowtune.families.wan.encoder import LATENTS, TEXT, TEXT_LENGTH, padded_text
from flowtune.flow_matching.adapters.base import ExampleSize, FlowMatchingContext, ModelAdapter


class WanAdapter(ModelAdapter):
    """Model adapter for Wan 2.1 text-to-video (and fine-tunes) in diffusers' layout.

    Batch keys (as written by ``flowtune preprocess`` and collated):
        video_latents: [B, 16, F', H/8, W/8] normalised VAE latents of clips of F = 4 (F' - 1) + 1
            frames (F' = 1: still images).
        text_embeddings: [B, L, D] UMT5 last hidden states (D = 4096), each caption zero-padded
            at the end to the batch's longest; [L, D] accepted for B = 1.  A
            ``text_embeddings_mask`` from the collator is not needed: the padding is zeros, as in
            the pipeline's tensor.
        text_length (optional): [B, max_sequence_length, 0], an empty tensor whose shape gives
            the length the pipeline zero-pads the text to (:mod:`flowtune.families.wan.encoder`);
            absent: the embeddings are used at their length.

    Transformer call (``WanTransformer3DModel.forward``, as ``WanPipeline`` makes it):
        hidden_states: [B, 16, F', H/8, W/8], the noisy latents (the model patchifies them 1x2x2).
        timestep: [B] float32 ``sigma * 1000``, as the pipeline passes its scheduler's ``t``.
        encoder_hidden_states: [B, max_sequence_length, D] the embeddings zero-padded, with
            per-sample caption dropout applied (a dropped sample's rows are zero).

    Wan 2.1 T2V takes no image condition: the pipeline's i2v choice for video batches is trained
    as text-to-video.  The transformer predicts the velocity ``noise - x0`` in the latents'
    layout, which :meth:`forward` returns as it is.
    """

    def example_shapes(self, config: dict[str, Any], size: ExampleSize) -> dict[str, tuple[int, ...]]:
        """``video_latents`` [B, in_channels, F', H / 8, W / 8] (F' from ``size.frames``),
        ``text_embeddings`` [B, L, text_dim] and ``text_length`` [B, L, 0]."""
        b, tokens = size.batch_size, size.text_tokens
        latent_frames = (max(int(size.frames), 1) - 1) // SPEC.frame_granularity + 1
        return {
            LATENTS: (
                b,
                int(config.get("in_channels", 16)),
                latent_frames,
                size.height // 8,
                size.width // 8,
            ),
            TEXT: (b, tokens, int(config.get("text_dim", 4096))),
            TEXT_LENGTH: (b, tokens, 0),
        }

    def prepare_inputs(self, context: FlowMatchingContext) -> dict[str, Any]:
        """Build the WanTransformer3DModel inputs from latents [B, 16, F', h, w].

        Caption dropout: the pipeline's ``cfg_dropout_mask``, else ``cfg_dropout_prob`` per
        sample (an adapter called directly).
        """
        context = self.step_context(context, 5, "video latents [B, C, F, H, W]")
        text = {TEXT: self.text_embeddings(context)}
        if TEXT_LENGTH in context.batch:
            text[TEXT_LENGTH] = context.batch[TEXT_LENGTH]
        return {
            "hidden_states": context.noisy_latents,
            "timestep": context.timesteps.to(context.device, dtype=torch.float32),
            "encoder_hidden_states": self.apply_cfg_dropout(padded_text(text), context),
        }

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Run the transformer; returns the velocity prediction [B, 16, F', h, w]."""
        return self.post_process_prediction(model(**inputs, return_dict=False))
