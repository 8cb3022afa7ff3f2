"""Wan 2.1 encoding: unpadded UMT5 caption embeddings with the length the pipeline pads them to,
per-channel normalised latents of clips (and of images as one-frame clips).

Text goes through ``WanPipeline.encode_prompt``: the caption cleaned (``prompt_clean``: ftfy when
installed, HTML entities, whitespace), UMT5's last hidden state over the caption's tokens (its
``</s>`` included, truncated to ``max_sequence_length``) with the attention mask, then each row
cut to its tokens and zero-padded back to ``max_sequence_length`` (512): the transformer sees
all 512 positions, the padding as zero vectors (WanTransformer3DModel takes no text mask).  The
cache keeps each caption unpadded ([L_i, 4096], a sequence field) and, in ``text_length``, the
length the pipeline pads to, carried by the shape of an empty tensor ([max_sequence_length, 0])
so that the adapter and :meth:`WanEncoder.prompt_inputs` rebuild the padded tensor without
reading a device tensor back.  Each caption is encoded on its own, as the pipeline encodes a
prompt at sampling time.

Clips go through the pipeline's ``video_processor`` (RGB in [0, 255] -> [-1, 1], [B, 3, F, H, W]),
each clip alone through the causal 3D VAE, then the VAE config's per-channel statistics,
``(z - latents_mean) * (1 / latents_std)``, as Wan's pipelines encode their input videos
(``WanVideoToVideoPipeline.prepare_latents``): F frames (4n + 1) give F' = (F - 1) / 4 + 1 latent
frames.  Images are one-frame clips: ``video_latents`` [B, 16, 1, H/8, W/8].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from flowtune.encoders.base import FamilyEncoder
from flowtune.families.qwen_image.encoder import normalize_latents

if TYPE_CHECKING:
    from PIL import Image

LATENTS = "video_latents"
TEXT = "text_embeddings"
TEXT_LENGTH = "text_length"


def padded_text(text: dict[str, torch.Tensor]) -> torch.Tensor:
    """The cached text fields' ``text_embeddings`` [B, L, D] (zero-padded to the batch's longest,
    or one caption's) zero-padded at the end to ``text_length``'s length, [B, max_sequence_length,
    D], as ``WanPipeline._get_t5_prompt_embeds`` pads them; without ``text_length``, unchanged."""
    embeddings = text[TEXT]
    length = text[TEXT_LENGTH].shape[-2] if TEXT_LENGTH in text else embeddings.shape[-2]
    if length < embeddings.shape[-2]:
        raise ValueError(
            f"text_embeddings have {embeddings.shape[-2]} positions, more than text_length {length}"
        )
    return F.pad(embeddings, (0, 0, 0, length - embeddings.shape[-2]))


class WanEncoder(FamilyEncoder):
    """Wan 2.1 encoder; outputs the batch keys :class:`WanAdapter` reads."""

    image_components: ClassVar[tuple[str, ...]] = ("vae",)
    text_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")
    image_fields: ClassVar[dict[str, bool]] = {LATENTS: False}
    text_fields: ClassVar[dict[str, bool]] = {TEXT: True, TEXT_LENGTH: False}

    @torch.no_grad()
    def encode_videos(
        self, clips: list[list[Image.Image]], generators: list[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        """B clips of F same-sized RGB frames [H, W] -> ``{"video_latents": [B, 16, F', H/8, W/8]}``
        (normalised), F' = (F - 1) / 4 + 1."""
        pixels = self.pipe.video_processor.preprocess_video(clips)  # [B, 3, F, H, W] in [-1, 1]
        vae = self.pipe.vae
        latents = []
        for i, clip in enumerate(pixels):  # one at a time, as Wan's pipelines encode videos
            dist = vae.encode(clip[None].to(self.device, dtype=vae.dtype)).latent_dist
            if self.settings.latent_dist == "sample":
                z = dist.sample(generator=generators[i] if generators is not None else None)
            else:
                z = dist.mode()
            latents.append(z.float())
        # Normalised in float32 as the pipelines do (they prepare latents in float32), then stored
        # in model.dtype.
        return {LATENTS: normalize_latents(vae, torch.cat(latents)).to(self.dtype)}

    def encode_images(
        self, images: list[Image.Image], generators: list[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        """B same-sized RGB images [H, W] as one-frame clips -> ``{"video_latents": [B, 16, 1,
        H/8, W/8]}``."""
        return self.encode_videos([[image] for image in images], generators)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, list[torch.Tensor]]:
        """B captions -> ``{"text_embeddings": B tensors [L_i, D], "text_length": B empty tensors
        [max_sequence_length, 0]}``: each caption's embeddings without the pipeline's zero padding
        (L_i its tokens, ``</s>`` included)."""
        length = self.settings.max_sequence_length
        rows = []
        for prompt in prompts:  # one at a time, as the pipeline encodes a prompt
            embeddings, _ = self.pipe.encode_prompt(
                prompt=[prompt],
                do_classifier_free_guidance=False,
                max_sequence_length=length,
                device=self.device,
            )
            rows.append(embeddings[0, : self._token_count(prompt, length)])
        empty = torch.zeros(length, 0, dtype=self.dtype)
        return {TEXT: rows, TEXT_LENGTH: torch.stack([empty] * len(prompts))}

    def _token_count(self, prompt: str, max_length: int) -> int:
        """The tokens the pipeline keeps of ``prompt`` (its mask's sum): cleaned as
        ``_get_t5_prompt_embeds`` cleans it, ``</s>`` included, at most ``max_length``."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        ids = self.pipe.tokenizer(prompt_clean(prompt), truncation=True, max_length=max_length).input_ids
        return len(ids)

    @classmethod
    def prompt_inputs(cls, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``WanPipeline(prompt_embeds=[B, max_sequence_length, D])``: the cached embeddings
        zero-padded as the pipeline pads the ones it computes."""
        return {"prompt_embeds": padded_text(text)}

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens per caption as the pipeline tokenizes it before truncating (``</s>`` included)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir / "tokenizer")
        return [len(tokenizer(prompt_clean(p)).input_ids) for p in prompts]
