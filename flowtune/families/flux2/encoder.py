"""FLUX.2 encoding: Mistral3 hidden-state embeddings, patchified and BN-normalized VAE latents.

Text goes through ``Flux2Pipeline.encode_prompt``: the caption in Mistral's chat format after
FLUX.2's system message, padded to L = ``max_sequence_length`` tokens, and the text encoder's
hidden states 10, 20 and 30 concatenated per token ([B, L, 3 x 5120] for FLUX.2 [dev]).  Images go
through the pipeline's ``image_processor`` (RGB in [0, 255] -> [-1, 1]), ``vae.encode(x).latent_dist``,
the 2x2 patchify to 4x the channels (``Flux2Pipeline._patchify_latents``) and the normalization
with the VAE's batch-norm running statistics, ``(x - running_mean) / sqrt(running_var + eps)``,
as ``Flux2Pipeline`` prepares its reference images; that is also the space it denoises in.

FLUX.2 [dev] ships its tokenizer as a PixtralProcessor, which transformers loads only with
torchvision installed; text encoding needs the tokenizer alone, so flowtune loads just that
(:func:`load_tokenizer`), which works with or without torchvision.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from flowtune.encoders.base import FamilyEncoder
from flowtune.errors import FlowtuneError

if TYPE_CHECKING:
    from PIL import Image

REFERENCE_MAX_AREA = 1024 * 1024
"""Flux2Pipeline scales down reference images larger than this many pixels (keeping the aspect
ratio) before cropping their sides to multiples of 16."""


def load_tokenizer(folder: Path) -> Any:
    """The Mistral tokenizer of a FLUX.2 model's ``tokenizer`` folder, with its chat template.

    The folder may hold a plain tokenizer or a processor (tokenizer files plus an image
    processor); the chat template may be in the tokenizer's files or, for a processor, in
    ``chat_template.jinja`` / ``chat_template.json`` beside them.

    Raises:
        FlowtuneError: the folder has no chat template (Flux2Pipeline formats prompts with it).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        jinja, as_json = folder / "chat_template.jinja", folder / "chat_template.json"
        if jinja.is_file():
            tokenizer.chat_template = jinja.read_text(encoding="utf-8")
        elif as_json.is_file():
            tokenizer.chat_template = json.loads(as_json.read_text(encoding="utf-8"))["chat_template"]
    if not tokenizer.chat_template:
        raise FlowtuneError(
            f"the FLUX.2 tokenizer in {folder} has no chat template (chat_template.jinja); "
            "Flux2Pipeline needs it to format prompts"
        )
    return tokenizer


class Flux2Encoder(FamilyEncoder):
    """FLUX.2 [dev] encoder; outputs the batch keys :class:`Flux2Adapter` reads."""

    image_components: ClassVar[tuple[str, ...]] = ("vae",)
    text_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")
    image_fields: ClassVar[dict[str, bool]] = {"image_latents": False}
    text_fields: ClassVar[dict[str, bool]] = {"text_embeddings": True}
    prompt_pipeline: ClassVar[str] = "Flux2Pipeline"
    """The diffusers pipeline whose ``encode_prompt`` encodes the captions (its default
    ``text_encoder_out_layers`` are the hidden states read)."""

    @classmethod
    def prune_text_encoder(cls, component: str, model: torch.nn.Module) -> None:
        """Keep of the language model only the layers up to the highest hidden state
        ``encode_prompt`` reads (FLUX.2 [dev]'s Mistral3: 31 of 40 for hidden state 30; [klein]'s
        Qwen3: 28 of 36 for hidden state 27), and neither its vocabulary head nor a vision tower
        (text prompts never run it)."""
        import inspect

        import diffusers

        from flowtune.encoders.prune import drop_output_head, drop_submodules, keep_hidden_states_through

        encode = getattr(diffusers, cls.prompt_pipeline).encode_prompt
        layers = inspect.signature(encode).parameters["text_encoder_out_layers"].default
        keep_hidden_states_through(model, max(layers))
        drop_output_head(model)
        drop_submodules(model, ("model.vision_tower", "model.multi_modal_projector"))

    @classmethod
    def pipeline_components(cls, model_dir: Path, without: Iterable[str]) -> dict[str, Any]:
        """The tokenizer, loaded by :func:`load_tokenizer` (no torchvision needed)."""
        if "tokenizer" in without:
            return {}
        return {"tokenizer": load_tokenizer(model_dir / "tokenizer")}

    @torch.no_grad()
    def encode_images(
        self, images: list[Image.Image], generators: list[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        """B same-sized RGB images [H, W] -> ``{"image_latents": [B, 128, H/16, W/16]}``
        (patchified, BN-normalized)."""
        pixels = self.pipe.image_processor.preprocess(images).to(self.device, dtype=self.dtype)
        dist = self.pipe.vae.encode(pixels).latent_dist
        z = dist.sample(generator=generators) if self.settings.latent_dist == "sample" else dist.mode()
        return {"image_latents": normalize_latents(self.pipe, z)}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """B captions -> ``text_embeddings`` [B, L, 3 x hidden] (Mistral3 hidden states 10, 20, 30)."""
        text, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.settings.max_sequence_length
        )
        return {"text_embeddings": text}

    @classmethod
    def prompt_inputs(cls, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``Flux2Pipeline(prompt_embeds=[B, L, D])``."""
        return {"prompt_embeds": text["text_embeddings"]}

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens per prompt as ``encode_prompt`` tokenizes it before truncating to L: the
        system message and chat markup included."""
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        tokenizer = load_tokenizer(self.model_dir / "tokenizer")
        encoded = tokenizer.apply_chat_template(
            format_input(prompts=prompts, system_message=SYSTEM_MESSAGE),
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
        )
        return [len(row) for row in encoded["input_ids"]]

    # -- reference images ---------------------------------------------------------------------

    def control_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) Flux2Pipeline encodes a ``width`` x ``height`` reference at:
        scaled down to at most 1024 x 1024 pixels of area, then sides floored to multiples of 16."""
        if width * height > REFERENCE_MAX_AREA:
            scale = math.sqrt(REFERENCE_MAX_AREA / (width * height))
            width, height = int(width * scale), int(height * scale)
        g = self.spec.spatial_granularity
        return width // g * g, height // g * g

    def prepare_control(self, image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
        """``image`` brought to ``size`` = (width, height) (needs :meth:`load` with ``images=True``).

        ``mode`` is ``data.control_resize``: ``match_target`` resizes with the pipeline's image
        processor; otherwise as Flux2Pipeline does: scaled down (Lanczos) if larger than
        1024 x 1024 in area, then centre-cropped to ``size``.
        """
        processor = self.pipe.image_processor
        if mode == "match_target":
            return processor.resize(image, size[1], size[0])
        if image.width * image.height > REFERENCE_MAX_AREA:
            image = processor._resize_to_target_area(image, REFERENCE_MAX_AREA)
        return processor._resize_and_crop(image, *size)

    @classmethod
    def reference_problem(cls, width: int, height: int) -> str | None:
        """Flux2Pipeline's own check of its input images (at least 64 px a side, an aspect ratio
        of at most 8:1), run on a blank 1-bit image of that size."""
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
        from PIL import Image as PILImage

        try:
            Flux2ImageProcessor.check_image_input(PILImage.new("1", (width, height)))
        except ValueError as exc:
            return f"Flux2Pipeline refuses it ({exc})"
        return None

    @classmethod
    def reference_inputs(
        cls, pipe: Any, images: list[Image.Image], height: int, width: int, control_resize: str = "pipeline"
    ) -> dict[str, Any]:
        """Flux2Pipeline's ``image`` argument: the references, resized as training resized them
        (``match_target``: to (width, height) with the pipeline's image processor; otherwise
        left for the pipeline to resize)."""
        if control_resize == "match_target":
            images = [pipe.image_processor.resize(image, height, width) for image in images]
        return {"image": list(images)}


def normalize_latents(pipe: Any, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents [B, 32, h, w] -> patchified, BN-normalized latents [B, 128, h/2, w/2], as
    ``Flux2Pipeline._encode_vae_image`` computes them."""
    latents = pipe._patchify_latents(z)
    mean, std = bn_statistics(pipe.vae, latents)
    return (latents - mean) / std


def bn_statistics(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE batch norm's running mean and sqrt(running_var + eps), [1, 128, 1, 1] each, on the
    device and in the dtype of ``like``."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
        like.device, like.dtype
    )
    return mean, std
