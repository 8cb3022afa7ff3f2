"""FLUX.1 encoding: CLIP pooled + T5 sequence embeddings, and shifted-and-scaled VAE latents.

Text goes through ``FluxPipeline.encode_prompt`` (CLIP-L pooled output [B, 768] and T5-XXL hidden
states [B, L, 4096], L = ``max_sequence_length``, padded to L as FLUX.1 was trained).  Images go
through the pipeline's ``image_processor`` (RGB in [0, 255] -> [-1, 1]) and
``vae.encode(x).latent_dist``, then ``(z - shift_factor) * scaling_factor`` as FluxPipeline does
before packing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from flowtune.encoders.base import FamilyEncoder

if TYPE_CHECKING:
    from PIL import Image


class FluxEncoder(FamilyEncoder):
    """FLUX.1 [dev]/[schnell] encoder; outputs the batch keys :class:`FluxAdapter` reads."""

    image_components: ClassVar[tuple[str, ...]] = ("vae",)
    text_components: ClassVar[tuple[str, ...]] = (
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
    )
    image_fields: ClassVar[dict[str, bool]] = {"image_latents": False}
    text_fields: ClassVar[dict[str, bool]] = {"text_embeddings": True, "pooled_prompt_embeds": False}

    @torch.no_grad()
    def encode_images(
        self, images: list[Image.Image], generators: list[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        """B same-sized RGB images [H, W] -> ``{"image_latents": [B, 16, H/8, W/8]}`` (normalised)."""
        vae = self.pipe.vae
        pixels = self.pipe.image_processor.preprocess(images).to(self.device, dtype=self.dtype)
        dist = vae.encode(pixels).latent_dist
        if self.settings.latent_dist == "sample":
            z = dist.sample(generator=generators)
        else:
            z = dist.mode()
        latents = (z - vae.config.shift_factor) * vae.config.scaling_factor
        return {"image_latents": latents}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """B captions -> ``text_embeddings`` [B, L, 4096] (T5) and ``pooled_prompt_embeds`` [B, 768] (CLIP)."""
        text, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.settings.max_sequence_length,
        )
        return {"text_embeddings": text, "pooled_prompt_embeds": pooled}

    @classmethod
    def prompt_inputs(cls, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``FluxPipeline(prompt_embeds=[B, L, 4096], pooled_prompt_embeds=[B, 768])``."""
        return {
            "prompt_embeds": text["text_embeddings"],
            "pooled_prompt_embeds": text["pooled_prompt_embeds"],
        }

    def token_counts(self, prompts: list[str]) -> list[int]:
        """T5 tokens per prompt, as ``encode_prompt`` tokenizes them before truncating to L."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir / "tokenizer_2")
        return [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
