"""FLUX.2 [klein] encoding: Qwen3 hidden-state embeddings; images as FLUX.2 [dev]'s.

Text goes through ``Flux2KleinPipeline.encode_prompt``: the caption as one user message in Qwen3's
chat format, with the assistant's turn opened and an empty thinking block (``enable_thinking``
false), padded to L = ``max_sequence_length`` tokens, and the Qwen3 hidden states 9, 18 and 27
(the pipeline's ``text_encoder_out_layers``) concatenated per token: [B, L, 3 x 4096 = 12288] for
klein 9B (Qwen3-8B), [B, L, 3 x 2560 = 7680] for klein 4B (Qwen3-4B).  The attention mask only
masks the padding inside Qwen3; the transformer sees all L tokens, padding included, as the
pipeline passes them (so no mask is cached).

Images and reference images are encoded exactly as for FLUX.2 [dev]
(:class:`flowtune.families.flux2.encoder.Flux2Encoder`: the same VAE, 2x2 patchify and batch-norm
normalization, and the same reference sizing, since Flux2KleinPipeline prepares them the same way).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch

from flowtune.families.flux2.encoder import Flux2Encoder


class Flux2KleinEncoder(Flux2Encoder):
    """FLUX.2 [klein] encoder; outputs the batch keys :class:`Flux2KleinAdapter` reads.

    Fields: ``image_latents`` [B, 128, H/16, W/16] (and ``control_latents_k`` for edit pairs), as
    :class:`Flux2Encoder`; ``text_embeddings`` [B, L, 3 x Qwen3 hidden].
    """

    prompt_pipeline: ClassVar[str] = "Flux2KleinPipeline"

    @classmethod
    def pipeline_components(cls, model_dir: Path, without: Iterable[str]) -> dict[str, Any]:
        """None: the Qwen2 tokenizer loads as the pipeline loads it (FLUX.2 [dev]'s own loading
        of its Pixtral processor does not apply)."""
        return {}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """B captions -> ``text_embeddings`` [B, L, 3 x hidden] (Qwen3 hidden states 9, 18, 27)."""
        text, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.settings.max_sequence_length
        )
        return {"text_embeddings": text}

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens per prompt as ``encode_prompt`` tokenizes it before truncating to L: the chat
        markup (12 tokens) included."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir / "tokenizer")
        counts = []
        for prompt in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            counts.append(len(tokenizer(text)["input_ids"]))
        return counts
