"""HunyuanVideo 1.5 encoding: unpadded Qwen2.5-VL and ByT5 caption embeddings, scaled VAE
latents of clips, and (image-to-video model folders) SigLIP embeddings of each clip's first frame.

Text goes through ``HunyuanVideo15Pipeline.encode_prompt``, one caption at a time as the pipeline
encodes a prompt at sampling time:

- ``text_embeddings`` [L, 3584]: the caption as the user turn after the pipeline's system prompt
  (Qwen2.5-VL's chat template, the assistant's turn opened), the text model's third-to-last
  hidden state, the template's first 108 tokens cropped (``prompt_template_encode_start_idx``),
  padded by the pipeline to ``tokenizer_max_length`` (here ``data.max_sequence_length``) and
  masked; the cache keeps the valid positions only.
- ``text_embeddings_2`` [L2, 1472]: ByT5 (Glyph-SDXL-v2) of the caption's quoted texts
  (``Text "..."``, ``extract_glyph_texts``), padded to 256 and masked; a caption without quotes
  has none: the pipeline's all-masked zeros, cached as 0 positions.

Batches are padded with zeros and masked by the loader (``text_embeddings_mask``,
``text_embeddings_2_mask``).  The transformer moves every masked text token behind the valid ones,
zeroes it and attends to none, so the shorter batches give the same prediction as the pipeline's
padded ones (up to float rounding), at a fraction of the cost (the pipeline's 1985 text and image
tokens are mostly padding).

Clips go through the pipeline's ``video_processor`` (RGB in [0, 255] -> [-1, 1]), then the causal
3D VAE, one clip at a time (diffusers' VAE attention takes one video per call), then
``* vae.config.scaling_factor``, as ``HunyuanVideo15ImageToVideoPipeline._get_image_latents``
encodes its image (and as the pipelines decode: ``latents / scaling_factor``).  The VAE is causal:
the first latent frame of a clip is its first frame's own latent, the image-to-video condition.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from flowtune.encoders.base import EncoderSettings, FamilyEncoder, first_frame_inputs
from flowtune.families import FamilySpec

if TYPE_CHECKING:
    from PIL import Image

# The image-to-video folders' extra components (HunyuanVideo15ImageToVideoPipeline).
VISION_COMPONENTS = ("image_encoder", "feature_extractor")


def has_image_encoder(model_dir: Path) -> bool:
    """Whether the model folder holds a SigLIP image encoder (an image-to-video model's)."""
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        return False
    components = json.loads(index.read_text(encoding="utf-8"))
    return all(isinstance(components.get(name), list) and components[name][0] for name in VISION_COMPONENTS)


def valid_rows(embeddings: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row of padded embeddings [B, L, D] at its valid positions (mask [B, L], nonzero where
    valid): B tensors [L_i, D] (L_i may be 0)."""
    return [row[keep.bool()] for row, keep in zip(embeddings, mask, strict=True)]


class HunyuanVideoEncoder(FamilyEncoder):
    """HunyuanVideo 1.5 encoder; outputs the batch keys :class:`HunyuanVideoAdapter` reads.

    Image fields: ``video_latents`` [C, F', H/16, W/16]; with an image-to-video folder (one with
    a SigLIP ``image_encoder``) also ``image_embeds`` [729, 1152], its embedding of the clip's
    first frame, which the adapter passes for the samples trained image-to-video.
    """

    image_components: ClassVar[tuple[str, ...]] = ("vae",)
    # The pipelines' constructors read the VAE's config: loaded for text encoding too.
    constructor_components: ClassVar[tuple[str, ...]] = ("vae",)
    text_components: ClassVar[tuple[str, ...]] = (
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
    )
    image_fields: ClassVar[dict[str, bool]] = {"video_latents": False}
    text_fields: ClassVar[dict[str, bool]] = {"text_embeddings": True, "text_embeddings_2": True}

    def __init__(
        self,
        spec: FamilySpec,
        model_dir: Path,
        settings: EncoderSettings,
        device: torch.device | str | None = None,
    ):
        super().__init__(spec, model_dir, settings, device)
        self.vision = has_image_encoder(self.model_dir)
        if self.vision:  # instance attributes: the folder decides
            self.image_components = ("vae", *VISION_COMPONENTS)
            self.image_fields = {"video_latents": False, "image_embeds": False}

    def load(self, *, images: bool, texts: bool) -> None:
        """Load as :meth:`FamilyEncoder.load` (an image-to-video folder through its own pipeline
        class: :func:`flowtune.encoders.base.load_pipeline`; the VAE always, as
        :attr:`constructor_components`); the text encoder pads to ``max_sequence_length`` tokens
        (the pipeline's ``tokenizer_max_length``, 1000)."""
        super().load(images=images, texts=texts)
        self.pipe.tokenizer_max_length = self.settings.max_sequence_length

    # -- images and clips --------------------------------------------------------------------

    @torch.no_grad()
    def encode_videos(
        self, clips: list[list[Image.Image]], generators: list[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        """B same-shaped clips of F = 4n + 1 frames [H, W] -> ``{"video_latents": [B, C, n + 1,
        H/16, W/16]}`` (scaled), and ``image_embeds`` [B, 729, 1152] of their first frames with
        an image-to-video folder."""
        vae = self.pipe.vae
        latents = []
        for i, frames in enumerate(clips):  # one clip per VAE call (module docstring)
            pixels = self.pipe.video_processor.preprocess(frames).to(self.device, dtype=self.dtype)
            dist = vae.encode(pixels.permute(1, 0, 2, 3)[None]).latent_dist  # [1, 3, F, H, W]
            if self.settings.latent_dist == "sample":
                z = dist.sample(generator=generators[i] if generators else None)
            else:
                z = dist.mode()
            latents.append(z * vae.config.scaling_factor)
        out = {"video_latents": torch.cat(latents)}
        if self.vision:
            out["image_embeds"] = torch.cat([self.first_frame_embeds(frames[0]) for frames in clips])
        return out

    @torch.no_grad()
    def encode_images(
        self, images: list[Image.Image], generators: list[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        """B same-sized images as one-frame clips: ``video_latents`` [B, C, 1, H/16, W/16]."""
        return self.encode_videos([[image] for image in images], generators)

    def first_frame_embeds(self, frame: Image.Image) -> torch.Tensor:
        """[1, N, D] SigLIP last hidden state of ``frame``, as the image-to-video pipeline's
        ``_get_image_embeds`` computes it from its image."""
        pipe = self.pipe
        embeds = pipe._get_image_embeds(pipe.image_encoder, pipe.feature_extractor, frame, self.device)
        return embeds.to(self.dtype)

    # -- captions ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, list[torch.Tensor]]:
        """B captions -> ``{"text_embeddings": B tensors [L_i, D], "text_embeddings_2": B tensors
        [L2_i, D2]}``: each caption's embeddings at its valid positions (sequence fields)."""
        rows: dict[str, list[torch.Tensor]] = {"text_embeddings": [], "text_embeddings_2": []}
        for prompt in prompts:  # one at a time, as the pipeline encodes a prompt
            text, mask, text_2, mask_2 = self.pipe.encode_prompt(
                prompt=[prompt], device=self.device, dtype=self.dtype
            )
            rows["text_embeddings"] += valid_rows(text, mask)
            rows["text_embeddings_2"] += valid_rows(text_2, mask_2)
        return rows

    @classmethod
    def prompt_inputs(cls, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``HunyuanVideo15Pipeline(prompt_embeds=[B, L, D], prompt_embeds_mask=[B, L],
        prompt_embeds_2=[B, L2, D2], prompt_embeds_mask_2=[B, L2])``: the batch's masks where it
        is padded, else all positions valid; no ByT5 positions (no quoted text) as one masked
        zero position, which the pipeline can take."""
        from flowtune.families.hunyuan_video.adapter import one_position_at_least

        inputs = {}
        for field, name in (("text_embeddings", "prompt_embeds"), ("text_embeddings_2", "prompt_embeds_2")):
            embeddings = text[field]
            mask = text.get(f"{field}_mask")
            if mask is None:
                mask = torch.ones(embeddings.shape[:2], dtype=torch.long, device=embeddings.device)
            embeddings, mask = one_position_at_least(embeddings, mask.long())
            inputs[name] = embeddings
            inputs[name.replace("prompt_embeds", "prompt_embeds_mask")] = mask
        return inputs

    @classmethod
    def reference_inputs(
        cls, pipe: Any, images: list[Image.Image], height: int, width: int, control_resize: str = "pipeline"
    ) -> dict[str, Any]:
        """The first frame of the clip (``FamilySpec.first_frame_images``):
        ``HunyuanVideo15ImageToVideoPipeline(image=...)``, which sizes the clip from it (cropped
        to the model's resolution bucket), as the pipeline does outside flowtune.

        Raises:
            ValueError: a text-to-video checkpoint (it takes no first frame), or not one image.
        """
        return first_frame_inputs(pipe, images)

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Qwen2.5-VL tokens per prompt as ``encode_prompt`` keeps them before padding or
        truncating to ``max_sequence_length``: the prompt in the chat template, less the
        template's first 108 tokens."""
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input
        from transformers import AutoTokenizer

        from flowtune.families.hunyuan_video.tiny import system_message

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir / "tokenizer")
        encoded = tokenizer.apply_chat_template(
            format_text_input(prompts, system_message()), add_generation_prompt=True, tokenize=True,
            return_dict=True,
        )  # fmt: skip
        return [len(ids) - PROMPT_TEMPLATE_START for ids in encoded["input_ids"]]


# The tokens of HunyuanVideo15Pipeline's chat template before the user's text, which it crops
# (its prompt_template_encode_start_idx).
PROMPT_TEMPLATE_START = 108
