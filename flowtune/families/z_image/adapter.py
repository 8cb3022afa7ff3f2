"""Z-Image adapter: lists of per-sample latents and unpadded Qwen3 caption embeddings, the
timestep as 1 - sigma, and the prediction's sign flipped into flowtune's velocity."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from flowtune.families.z_image.encoder import unpadded
from flowtune.flow_matching.adapters.base import (
    ExampleSize,
    FlowMatchingContext,
    ModelAdapter,
)


class ZImageAdapter(ModelAdapter):
    """Model adapter for Z-Image (Turbo, base and their fine-tunes) in diffusers' layout.

    ``ZImageTransformer2DModel`` takes a Python list with one latent [C, F, H, W] (F = 1 frame for
    images) and one caption embedding [L_i, D] per sample and patchifies the latents itself (2x2),
    so this adapter keeps the latents in their VAE layout and only splits the batch.

    Batch keys (as written by ``flowtune preprocess`` and collated):
        image_latents: [B, 16, H/8, W/8] normalized latents, ``(z - shift) * scale``.
        text_embeddings: [B, L, D] Qwen3 hidden states (D = 2560 for Z-Image), each caption
            padded at the end to the batch's longest; [L, D] accepted for B = 1.
        text_embeddings_mask: [B, L] bool, True on each caption's real tokens (the collator's);
            without it every token is real.

    Transformer call (``ZImageTransformer2DModel.forward``, as ``ZImagePipeline`` makes it):
        x: B tensors [16, 1, H/8, W/8], the noisy latents.
        t: [B] float32 ``1 - sigma`` (the pipeline's ``(1000 - t) / 1000``): 0 is pure noise,
            1 is data, the reverse of flowtune's sigma; the model scales it by ``t_scale``.
        cap_feats: B tensors [L_i, D], the captions without padding; a caption dropped for
            classifier-free-guidance training is all zeros (of its own length).

    The transformer predicts ``x0 - noise`` (ZImagePipeline negates it before its Euler step):
    :meth:`forward` returns its negation, the velocity ``noise - x0`` of flowtune's loss.
    """

    def example_shapes(self, config: dict[str, Any], size: ExampleSize) -> dict[str, tuple[int, ...]]:
        """``image_latents`` [B, in_channels, H / 8, W / 8] and ``text_embeddings``
        [B, L, cap_feat_dim] (every token real: no mask, which would need real values to apply)."""
        b = size.batch_size
        return {
            "image_latents": (b, int(config.get("in_channels", 16)), size.height // 8, size.width // 8),
            "text_embeddings": (b, size.text_tokens, int(config.get("cap_feat_dim", 2560))),
        }

    def prepare_inputs(self, context: FlowMatchingContext) -> dict[str, Any]:
        """Build the ZImageTransformer2DModel inputs from latents [B, 16, H, W].

        Caption dropout: the pipeline's ``cfg_dropout_mask``, else ``cfg_dropout_prob`` per
        sample (an adapter called directly).
        """
        context = self.step_context(context, 4, "latents [B, C, H, W]")
        latents = context.noisy_latents
        batch, device = context.batch, context.device
        text = self.text_embeddings(context)
        text = self.apply_cfg_dropout(text, context)
        return {
            "x": list(latents.unsqueeze(2).unbind(0)),
            "t": 1.0 - context.sigma.to(device, dtype=torch.float32),
            "cap_feats": unpadded(text, batch.get("text_embeddings_mask")),
        }

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Run the transformer; returns the velocity ``noise - x0`` [B, 16, H, W], the negated
        prediction, in the space of the stored latents."""
        out = self.post_process_prediction(model(**inputs, return_dict=False))
        return -torch.stack(out).squeeze(2)
