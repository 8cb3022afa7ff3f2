"""FLUX.1 Kontext adapter: FLUX.1 plus clean reference (control) images as extra tokens."""

from __future__ import annotations

from typing import Any

import torch

from flowtune.families.flux.adapter import FluxAdapter
from flowtune.flow_matching.adapters.base import FlowMatchingContext, control_keys


class FluxKontextAdapter(FluxAdapter):
    """Model adapter for FLUX.1 Kontext (image editing) in diffusers' layout.

    The transformer sees the noisy target tokens followed by the tokens of each clean reference
    image, as ``FluxKontextPipeline`` builds them: ``hidden_states`` = [target; references]
    along the sequence, target tokens with position ids (0, row, col) and reference tokens with
    (1, row, col).  The prediction is cut back to the target tokens, so the loss covers only the
    image being generated.

    Several references (``control_latents_1``, ...) share domain 1 and are laid out side by side
    on that plane like one mosaic, each placed right of or below the ones before (whichever keeps
    the mosaic closer to square), which is how ComfyUI feeds several references to Kontext
    ("offset" method).  diffusers' pipeline takes one reference, and with one the layouts agree.

    Batch keys, besides FLUX.1's (:class:`FluxAdapter`):
        control_latents_0, control_latents_1, ...: [B, C, h_k, w_k] normalized VAE latents of
            the references (sizes may differ from the target's and from each other).

    Args: as :class:`FluxAdapter`.
    """

    def _reference_tokens(
        self, batch: dict[str, Any], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pack the references and give them their position ids.

        Returns:
            tokens [B, N_ref, 4C] and ids [N_ref, 3] (rows (1, row + row offset, col + col offset)).
        """
        keys = control_keys(batch)
        if not keys:
            raise KeyError(
                "FLUX.1 Kontext batches need the reference latents control_latents_0 [B, C, h, w]; "
                "was the cache made for this family?"
            )
        tokens, ids = [], []
        mosaic_h = mosaic_w = 0  # extent of the references placed so far, in latent pixels
        for key in keys:
            latents = batch[key].to(device, dtype=dtype)
            b, _, h, w = latents.shape
            h_off = w_off = 0
            if h + mosaic_h > w + mosaic_w:
                w_off = mosaic_w
            else:
                h_off = mosaic_h
            mosaic_h = max(mosaic_h, h + h_off)
            mosaic_w = max(mosaic_w, w + w_off)
            ref_ids = self._prepare_latent_image_ids(b, h, w, device, dtype)[0].clone()
            ref_ids[:, 0] = 1
            ref_ids[:, 1] += (h_off + 1) // 2  # latent pixels -> 2x2 token units
            ref_ids[:, 2] += (w_off + 1) // 2
            tokens.append(self._pack_latents(latents))
            ids.append(ref_ids)
        return torch.cat(tokens, dim=1), torch.cat(ids, dim=0)

    def prepare_inputs(self, context: FlowMatchingContext) -> dict[str, Any]:
        """FLUX.1's inputs with the reference tokens appended to ``hidden_states``/``img_ids``."""
        inputs = super().prepare_inputs(context)
        tokens, ids = self._reference_tokens(context.batch, context.device, context.dtype)
        target = inputs["hidden_states"]
        return {
            **inputs,
            "hidden_states": torch.cat([target, tokens], dim=1),
            "img_ids": torch.cat([inputs["img_ids"], ids], dim=0),
            "target_tokens": target.shape[1],
        }
