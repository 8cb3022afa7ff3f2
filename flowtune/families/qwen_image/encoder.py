"""Qwen-Image encoding: unpadded Qwen2.5-VL caption embeddings, per-channel normalised VAE latents.

Text goes through ``QwenImagePipeline.encode_prompt``: the caption in the pipeline's chat template
(a system message asking for a detailed description, then the caption as the user turn), the text
encoder's last hidden state, and the template's first 34 tokens dropped
(``prompt_template_encode_start_idx``), so a caption of n tokens gives [n + 5, 3584] (the caption
and the closing ``<|im_end|>\\n<|im_start|>assistant\\n``), truncated to ``max_sequence_length``.
The cache keeps each caption unpadded (a sequence field); batches are padded with zeros and masked
(``text_embeddings_mask``), which the adapter passes as the transformer's
``encoder_hidden_states_mask`` as the pipeline passes its ``prompt_embeds_mask``.

Each caption is encoded on its own, as the pipeline encodes a prompt at sampling time: in a padded
batch the text encoder's outputs differ from those in the last float bits, and the cached
embeddings of a validation prompt are then exactly what the pipeline computes for it.

Images go through the pipeline's ``image_processor`` (RGB in [0, 255] -> [-1, 1]), as one-frame
videos through the causal 3D VAE (``vae.encode(x[:, :, None]).latent_dist``), then the VAE config's
per-channel statistics, ``(z - latents_mean) * (1 / latents_std)``, as Qwen-Image's pipelines
encode their input images (``_encode_vae_image``).  The cache stores them 4D, [B, 16, H/8, W/8],
the frame axis dropped; :class:`QwenImageAdapter` packs them into the transformer's tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from flowtune.encoders.base import FamilyEncoder

if TYPE_CHECKING:
    from PIL import Image


def normalize_latents(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents [B, 16, F, h, w] -> ``(z - latents_mean) * (1 / latents_std)`` per channel,
    with the same operations as ``QwenImagePipeline``'s ``_encode_vae_image`` (bit for bit)."""
    channels = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
    return (z - mean) * inverse_std


def unpadded(embeddings: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each row of padded embeddings [B, L, D] without its padding: B tensors [L_i, D], L_i the
    row's valid positions (a trailing run, as the pipeline pads); a None mask: all valid."""
    if mask is None:
        return list(embeddings)
    return [row[: int(length)] for row, length in zip(embeddings, mask.sum(dim=1), strict=True)]


class QwenImageEncoder(FamilyEncoder):
    """Qwen-Image encoder; outputs the batch keys :class:`QwenImageAdapter` reads."""

    image_components: ClassVar[tuple[str, ...]] = ("vae",)
    text_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")
    image_fields: ClassVar[dict[str, bool]] = {"image_latents": False}
    text_fields: ClassVar[dict[str, bool]] = {"text_embeddings": True}

    @classmethod
    def prune_text_encoder(cls, component: str, model: torch.nn.Module) -> None:
        """Qwen2.5-VL without its vocabulary head (the pipeline reads the last hidden state) and
        without its vision tower (text prompts never run it)."""
        from flowtune.encoders.prune import drop_output_head, drop_submodules

        drop_output_head(model)
        drop_submodules(model, ("model.visual",))

    @torch.no_grad()
    def encode_images(
        self, images: list[Image.Image], generators: list[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        """B same-sized RGB images [H, W] -> ``{"image_latents": [B, 16, H/8, W/8]}`` (normalised)."""
        pixels = self.pipe.image_processor.preprocess(images).to(self.device, dtype=self.dtype)
        dist = self.pipe.vae.encode(pixels[:, :, None]).latent_dist  # one-frame videos
        z = dist.sample(generator=generators) if self.settings.latent_dist == "sample" else dist.mode()
        return {"image_latents": normalize_latents(self.pipe.vae, z)[:, :, 0]}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, list[torch.Tensor]]:
        """B captions -> ``{"text_embeddings": B tensors [L_i, D]}``: each caption's embeddings,
        unpadded (a sequence field: the cache stores row i, the loader pads and masks)."""
        rows = []
        for prompt in prompts:  # one at a time, as the pipeline encodes a prompt (module docstring)
            text, mask = self.pipe.encode_prompt(
                prompt=[prompt], device=self.device, max_sequence_length=self.settings.max_sequence_length
            )
            rows += unpadded(text, mask)
        return {"text_embeddings": rows}

    @classmethod
    def prompt_inputs(cls, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``QwenImagePipeline(prompt_embeds=[B, L, D], prompt_embeds_mask=[B, L])``: the mask of
        a padded batch (``text_embeddings_mask``), else all positions valid."""
        embeddings = text["text_embeddings"]
        mask = text.get("text_embeddings_mask")
        if mask is None:
            mask = torch.ones(embeddings.shape[:2], dtype=torch.long, device=embeddings.device)
        return {"prompt_embeds": embeddings, "prompt_embeds_mask": mask.long()}

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens per prompt as ``encode_prompt`` keeps them before truncating to
        ``max_sequence_length``: the prompt in the pipeline's template, less the template's first
        ``prompt_template_encode_start_idx`` tokens."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir / "tokenizer")
        template, drop = prompt_template(self.spec.pipeline_class)
        return [len(ids) - drop for ids in tokenizer([template.format(p) for p in prompts])["input_ids"]]


def prompt_template(pipeline_class: str) -> tuple[str, int]:
    """The chat template a Qwen-Image pipeline puts a prompt in (``prompt_template_encode``, with
    ``{}`` for the prompt) and how many of its first tokens the pipeline drops from the text
    encoder's output (``prompt_template_encode_start_idx``), read from a component-less instance
    of the diffusers ``pipeline_class``."""
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class)
    empty = cls(**dict.fromkeys(inspect.signature(cls.__init__).parameters.keys() - {"self"}))
    return empty.prompt_template_encode, empty.prompt_template_encode_start_idx
