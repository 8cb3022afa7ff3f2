"""Adapter for transformers with the plain (hidden_states, timestep, encoder_hidden_states) call."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from flowtune.flow_matching.adapters.base import FlowMatchingContext, ModelAdapter, batched


class SimpleAdapter(ModelAdapter):
    """Adapter for models called as ``model(hidden_states, timestep, encoder_hidden_states)``.

    Expected batch keys:
        text_embeddings: [B, L, D] text encoder output ([L, D] accepted for B = 1).

    The model receives the noisy latents unchanged ([B, C, H, W] or [B, C, F, H, W]), the raw
    timesteps in [0, num_train_timesteps] ([B]), and the text embeddings with classifier-free
    guidance dropout applied per sample (the pipeline's mask, else ``cfg_dropout_prob``).  Its
    output must have the latents' shape.
    """

    def prepare_inputs(self, context: FlowMatchingContext) -> dict[str, Any]:
        """Model inputs: hidden_states, timestep, encoder_hidden_states."""
        context = self.resolve_cfg_dropout(context)
        b = context.noisy_latents.shape[0]
        text = batched(context.batch["text_embeddings"], 3, "text_embeddings", b)
        text = text.to(context.device, dtype=context.dtype)
        return {
            "hidden_states": context.noisy_latents,
            "timestep": context.timesteps.to(context.dtype),
            "encoder_hidden_states": self.apply_cfg_dropout(text, context),
        }

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Run the model; returns the prediction with the latents' shape."""
        return self.post_process_prediction(model(**inputs, return_dict=False))
