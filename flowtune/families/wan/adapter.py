"""Wan adapter: video latents as they are (Wan 2.1 I2V: with the mask and condition channels and
CLIP image tokens; Wan 2.2 TI2V: the first latent frame replaced by the clean condition, per-token
timesteps), UMT5 embeddings zero-padded to the pipeline's text length, the raw timestep."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from flowtune.families.wan import SPEC
from flowtune.families.wan.encoder import CONDITION, IMAGE, LATENTS, TEXT, TEXT_LENGTH, padded_text
from flowtune.flow_matching.adapters.base import (
    ExampleSize,
    FlowMatchingContext,
    ModelAdapter,
    batched,
)

# Wan 2.1 I2V's mask channels: one per frame a latent frame packs (the VAE's temporal factor).
MASK_CHANNELS = 4
# The Wan 2.2 VAE's latent channels (TI2V-5B; 16x spatial compression).
TI2V_LATENT_CHANNELS = 48
# CLIP ViT-H/14 tokens of a 224-pixel image (256 patches and the class token): Wan 2.1 I2V's
# image_embeds, for example batches.
IMAGE_TOKENS = 257


class WanAdapter(ModelAdapter):
    """Model adapter for Wan 2.1 T2V / I2V and Wan 2.2 TI2V (and fine-tunes) in diffusers' layout.

    Batch keys (as written by ``flowtune preprocess`` and collated):
        video_latents: [B, C, F', h, w] normalised VAE latents of clips of F = 4 (F' - 1) + 1
            frames (F' = 1: still images); C = 16, h = H/8 (Wan 2.1), C = 48, h = H/16 (TI2V).
        text_embeddings: [B, L, D] UMT5 last hidden states (D = 4096), each caption zero-padded
            at the end to the batch's longest; [L, D] accepted for B = 1.  A
            ``text_embeddings_mask`` from the collator is not needed: the padding is zeros, as in
            the pipeline's tensor.
        text_length (optional): [B, max_sequence_length, 0], an empty tensor whose shape gives
            the length the pipeline zero-pads the text to (:mod:`flowtune.families.wan.encoder`);
            absent: the embeddings are used at their length.
        condition_latents (image-to-video folders): Wan 2.1 I2V [B, 16, F', h, w], the VAE
            encoding of the first frame followed by black frames; TI2V [B, 48, 1, h, w], of the
            first frame alone.
        image_embeds (Wan 2.1 I2V): [B, 257, 1280] CLIP embeddings of the first frame.

    Transformer call (``WanTransformer3DModel.forward``):
        hidden_states: the noisy latents [B, C, F', h, w] (the model patchifies them 1x2x2), and
            - Wan 2.1 I2V (the batch has ``image_embeds``): as ``WanImageToVideoPipeline``
              concatenates them, [B, 16 + 4 + 16, F', h, w]: the noisy latents, 4 mask channels
              (1 on the first latent frame, 0 elsewhere) and ``condition_latents``.  Every sample
              is conditioned on its first frame, whatever ``context.i2v_mask`` says: the I2V
              checkpoints are image-to-video only (the pipeline requires an image, and the model
              was never trained on an empty condition), so ``flow.i2v_prob`` has no effect on
              them; still images are conditioned on themselves (a one-frame clip's condition).
            - Wan 2.2 TI2V (``condition_latents`` without ``image_embeds``): for the samples trained
              image-to-video (``context.i2v_mask``, or all when ``task_type`` is "i2v" without
              one) the first latent frame replaced by ``condition_latents``, as the pipeline's
              ``(1 - first_frame_mask) * condition + first_frame_mask * latents``; the other
              samples as ``WanPipeline`` (text-to-video) passes them.
        timestep: [B] float32 ``sigma * 1000``, as the pipelines pass their scheduler's ``t``;
            TI2V: [B, F' * h/2 * w/2] per token (``expand_timesteps``), ``t`` on every token but
            the first latent frame's of an image-to-video sample, 0 there.
        encoder_hidden_states: [B, max_sequence_length, D] the embeddings zero-padded, with
            per-sample caption dropout applied (a dropped sample's rows are zero; its image
            conditioning is kept, as the pipeline's unconditional pass keeps it).
        encoder_hidden_states_image (Wan 2.1 I2V): ``image_embeds``.

    The transformer predicts the velocity ``noise - x0`` in the latents' layout, which
    :meth:`forward` returns as it is.  On a TI2V image-to-video sample the first latent frame is
    given clean at timestep 0, so its prediction is not trained (:meth:`loss_mask`).
    """

    def example_shapes(self, config: dict[str, Any], size: ExampleSize) -> dict[str, tuple[int, ...]]:
        """``video_latents`` [B, out_channels, F', h, w] (F' from ``size.frames``; h = H / 8, or
        H / 16 for the 48 latent channels of the Wan 2.2 VAE, the only Wan VAE with 48),
        ``text_embeddings`` [B, L, text_dim] and ``text_length`` [B, L, 0]; a transformer with an
        ``image_dim`` (Wan 2.1 I2V) also ``condition_latents`` shaped like the latents and
        ``image_embeds`` [B, 257, image_dim]; the Wan 2.2 TI2V latents a one-frame
        ``condition_latents``."""
        b, tokens = size.batch_size, size.text_tokens
        latent_frames = (max(int(size.frames), 1) - 1) // SPEC.frame_granularity + 1
        channels = int(config.get("out_channels") or config.get("in_channels", 16))
        scale = 16 if channels == TI2V_LATENT_CHANNELS else 8
        latents = (b, channels, latent_frames, size.height // scale, size.width // scale)
        shapes = {
            LATENTS: latents,
            TEXT: (b, tokens, int(config.get("text_dim", 4096))),
            TEXT_LENGTH: (b, tokens, 0),
        }
        if config.get("image_dim"):
            shapes[CONDITION] = latents
            shapes[IMAGE] = (b, IMAGE_TOKENS, int(config["image_dim"]))
        elif channels == TI2V_LATENT_CHANNELS:
            shapes[CONDITION] = (*latents[:2], 1, *latents[3:])
        return shapes

    @staticmethod
    def first_frame_mask(context: FlowMatchingContext) -> torch.Tensor:
        """[B, 1, F', h, w] float32: 0 on the first latent frame of the samples trained
        image-to-video, 1 elsewhere (TI2V's ``first_frame_mask``, per sample)."""
        b, _, f, h, w = context.noisy_latents.shape
        mask = torch.ones(b, 1, f, h, w, device=context.device)
        mask[:, :, 0] = (~ModelAdapter.i2v_samples(context)).float().view(b, 1, 1, 1)
        return mask

    def prepare_inputs(self, context: FlowMatchingContext) -> dict[str, Any]:
        """Build the WanTransformer3DModel inputs from latents [B, C, F', h, w].

        Caption dropout: the pipeline's ``cfg_dropout_mask``, else ``cfg_dropout_prob`` per
        sample (an adapter called directly).
        """
        context = self.step_context(context, 5, "video latents [B, C, F, H, W]")
        batch, device, dtype = context.batch, context.device, context.dtype
        text = {TEXT: self.text_embeddings(context)}
        if TEXT_LENGTH in batch:
            text[TEXT_LENGTH] = batch[TEXT_LENGTH]
        hidden = context.noisy_latents
        timestep = context.timesteps.to(device, dtype=torch.float32)
        b = hidden.shape[0]
        inputs: dict[str, Any] = {}
        if IMAGE in batch:  # Wan 2.1 I2V: mask and condition channels, CLIP tokens
            condition = batched(batch[CONDITION], 5, CONDITION, b).to(device, dtype=dtype)
            mask = torch.zeros_like(condition[:, :MASK_CHANNELS])
            mask[:, :, 0] = 1
            hidden = torch.cat([hidden, mask, condition], dim=1)
            inputs["encoder_hidden_states_image"] = batched(batch[IMAGE], 3, IMAGE, b).to(device, dtype=dtype)
        elif CONDITION in batch:  # Wan 2.2 TI2V: the clean first frame in the latents
            condition = batched(batch[CONDITION], 5, CONDITION, b).to(device, dtype=dtype)
            mask = self.first_frame_mask(context)
            hidden = torch.where(mask.bool(), hidden, condition[:, :, :1])
            # The pipelines' per-token timesteps: the mask at the 1x2x2 patches' positions.
            timestep = (mask[:, 0, :, ::2, ::2] * timestep.view(b, 1, 1, 1)).flatten(1)
        return {
            "hidden_states": hidden,
            "timestep": timestep,
            "encoder_hidden_states": self.apply_cfg_dropout(padded_text(text), context),
            **inputs,
        }

    def loss_mask(self, context: FlowMatchingContext) -> torch.Tensor | None:
        """[B, 1, F', 1, 1]: 0 on the first latent frame of a TI2V image-to-video sample (given
        clean at timestep 0: its velocity target's noise is not in the input, and the pipeline
        discards that frame's prediction), 1 elsewhere; None for Wan 2.1 batches."""
        if IMAGE in context.batch or CONDITION not in context.batch:
            return None
        return self.first_frame_mask(context)[:, :, :, :1, :1]

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Run the transformer; returns the velocity prediction [B, C, F', h, w]."""
        return self.post_process_prediction(model(**inputs, return_dict=False))
