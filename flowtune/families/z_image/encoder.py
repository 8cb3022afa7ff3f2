"""Z-Image encoding: unpadded Qwen3 caption embeddings, shifted-and-scaled FLUX.1-style latents.

Text goes through ``ZImagePipeline.encode_prompt``: the caption as one user turn of Qwen3's chat
template (generation prompt added, ``enable_thinking=True``, so no empty thinking block), padded
to L = ``max_sequence_length`` tokens for the text encoder, and the text encoder's second-to-last
hidden state with the padding cut off: per caption [L_i, 2560] for Z-Image's Qwen3-4B, where L_i
counts the chat markup too.  The cache keeps each caption unpadded (a sequence field); the
collator pads a batch with a mask, and the adapter cuts the padding off again, so that the
transformer sees exactly the pipeline's list of per-prompt tensors.

Images go through the pipeline's ``image_processor`` and ``vae.encode(x).latent_dist``, then
``(z - shift_factor) * scaling_factor``, as ``ZImageImg2ImgPipeline`` encodes images (the inverse
of ``ZImagePipeline``'s decoding): the FLUX.1 VAE and normalization, so
:class:`~flowtune.families.flux.encoder.FluxEncoder`'s image encoding is reused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from flowtune.families.flux.encoder import FluxEncoder


def unpadded(text: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The per-prompt embeddings list ZImagePipeline and its transformer take, from a batch.

    Args:
        text: [B, L, D] embeddings, padded at the end ([L, D] for one prompt).
        mask: [B, L] bool, True on each row's first L_i tokens, the real ones (the collator's
            ``text_embeddings_mask``, present only for a padded batch); None: every token is real.

    Returns:
        B tensors [L_i, D].
    """
    if text.ndim == 2:
        text = text.unsqueeze(0)
    if mask is None:
        return list(text.unbind(0))
    lengths = mask.sum(dim=1).tolist()  # one read-back for the batch (the padding is at the end)
    return [row[:length] for row, length in zip(text, lengths, strict=True)]


class ZImageEncoder(FluxEncoder):
    """Z-Image (Turbo and base) encoder; outputs the batch keys :class:`ZImageAdapter` reads.

    Fields: ``image_latents`` [16, H/8, W/8] (normalized), ``text_embeddings`` [L_i, D] (a
    sequence: each caption's own length, no padding).
    """

    text_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")
    text_fields: ClassVar[dict[str, bool]] = {"text_embeddings": True}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        """B captions -> ``{"text_embeddings": B tensors [L_i, D]}`` (``encode_prompt``'s list)."""
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts),  # _encode_prompt rewrites the list's items in place
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.settings.max_sequence_length,
        )
        return {"text_embeddings": [e.to(self.dtype) for e in embeds]}

    @classmethod
    def prompt_inputs(cls, text: dict[str, torch.Tensor]) -> dict[str, Any]:
        """``ZImagePipeline(prompt_embeds=[B tensors [L_i, D]])`` from ``text_embeddings`` [B, L, D]
        and, for a padded batch, ``text_embeddings_mask`` [B, L]."""
        return {"prompt_embeds": unpadded(text["text_embeddings"], text.get("text_embeddings_mask"))}

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens per prompt as ``encode_prompt`` tokenizes it before truncating to L: the chat
        markup included."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir / "tokenizer")
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=True,
            )
            for prompt in prompts
        ]
        return [len(ids) for ids in tokenizer(texts)["input_ids"]]
