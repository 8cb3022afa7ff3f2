"""Qwen-Image-Edit adapter: Qwen-Image's inputs, plus the reference images' packed latents after
the target's tokens, each with its own entry in ``img_shapes``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from flowtune.families.qwen_image.adapter import QwenImageAdapter
from flowtune.flow_matching.adapters.base import FlowMatchingContext, control_keys


class QwenImageEditAdapter(QwenImageAdapter):
    """Model adapter for Qwen-Image-Edit-2509 / -2511 (``QwenImageEditPlusPipeline``).

    Batch keys: those of :class:`QwenImageAdapter` (``text_embeddings`` are the vision-language
    prompt's: they depend on the reference images too), plus
        control_latents_0, control_latents_1, ... : [B, 16, h_k, w_k] normalised latents of the
            reference images (1 to 3), each at its own size (the pipeline encodes a reference at
            about 1024 x 1024 pixels of area, whatever the target's size).

    Transformer call: as :class:`QwenImageAdapter`'s, except
        hidden_states: [B, N + sum_k N_k, 64]: the noisy target's packed tokens, then each
            reference's clean packed tokens, in reference order (``QwenImageEditPlusPipeline``
            concatenates its ``image_latents`` after the latents);
        img_shapes: ``[[(1, H/2, W/2), (1, h_0/2, w_0/2), ...]] * B``: the target first, then each
            reference, for the RoPE (and, in Qwen-Image-Edit-2511, ``zero_cond_t``: the
            transformer gives the reference tokens the timestep 0).

    The prediction covers the target's N tokens only (the pipeline cuts
    ``noise_pred[:, : latents.size(1)]``).
    """

    def prepare_inputs(self, context: FlowMatchingContext) -> dict[str, Any]:
        """Qwen-Image's inputs with the references' tokens appended (see the class docstring)."""
        inputs = super().prepare_inputs(context)
        keys = control_keys(context.batch)
        if not keys:
            return inputs
        tokens, shapes = [inputs["hidden_states"]], list(inputs["img_shapes"][0])
        for key in keys:
            latents = context.batch[key].to(context.device, dtype=context.dtype)
            _, _, h, w = latents.shape
            tokens.append(self._pack_latents(latents))
            shapes.append((1, h // 2, w // 2))
        b = inputs["hidden_states"].shape[0]
        inputs["target_tokens"] = inputs["hidden_states"].shape[1]
        inputs["hidden_states"] = torch.cat(tokens, dim=1)
        inputs["img_shapes"] = [shapes] * b
        return inputs

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Run the transformer; returns the target's prediction [B, 16, H, W] (the references'
        tokens cut off)."""
        inputs = dict(inputs)
        h, w = inputs.pop("latent_size")
        target_tokens = inputs.pop("target_tokens", None)
        pred = self.post_process_prediction(model(**inputs, return_dict=False))
        if target_tokens is not None:
            pred = pred[:, :target_tokens]
        return self._unpack_latents(pred, h * 8, w * 8)
