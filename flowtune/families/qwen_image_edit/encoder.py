"""Qwen-Image-Edit encoding (``QwenImageEditPlusPipeline``): Qwen-Image's, with reference images.

Images (the target and each reference) go through the VAE as one-frame videos and are normalised
as the edit pipeline normalises its references, ``(z - latents_mean) / latents_std`` (a division:
Qwen-Image's img2img pipelines multiply by ``1 / latents_std``, which differs in the last bit).
A reference is encoded at about 1024 x 1024 pixels of area with its aspect ratio, sides multiples
of 32 (``calculate_dimensions(VAE_IMAGE_SIZE, ratio)``), resized without cropping, as the pipeline
does, whatever the target's size; ``data.control_resize: match_target`` resizes it to the target's
bucket instead.

The prompt is a vision-language prompt: the pipeline puts "Picture k: <|vision_start|>
<|image_pad|><|vision_end|>" per reference before the instruction, runs Qwen2.5-VL on the
instruction *and* the references (resized to about 384 x 384 pixels of area,
``CONDITION_IMAGE_SIZE``) through its ``processor``, and drops the template's first 64 tokens.
So a caption's embeddings depend on its reference images: :meth:`QwenImageEditEncoder.encode_prompts`
takes them, and the encoder declares ``text_uses_references``: preprocess keys a caption's entry by
its references too and hands them to :meth:`encode_prompts`, and validation samples with the text
encoder loaded (:class:`flowtune.encoders.FamilyEncoder`).

The ``processor`` (a ``Qwen2VLProcessor``) is loaded flowtune's own way
(:meth:`QwenImageEditEncoder.pipeline_components`, :func:`load_processor`): transformers 5.24
refuses to build one without its video processor, which needs torchvision; the edit pipeline uses
only its tokenizer and image processor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from flowtune.families.qwen_image.encoder import QwenImageEncoder, unpadded

if TYPE_CHECKING:
    from PIL import Image

MAX_REFERENCES = 3
"""Qwen-Image-Edit-2509/2511 are trained with one to three reference images."""


def image_only_processor(image_processor: Any, tokenizer: Any) -> Any:
    """A ``Qwen2VLProcessor`` of ``image_processor`` and ``tokenizer`` without a video processor.

    transformers checks each component's class when building a processor, and the video
    processor's class needs torchvision; the check is skipped for the missing video processor only
    (a subclass builds it, then the object becomes a plain ``Qwen2VLProcessor``, the class the
    pipeline's model_index.json names).
    """
    from transformers import Qwen2VLProcessor

    class _ImageOnly(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    processor = _ImageOnly(image_processor=image_processor, tokenizer=tokenizer)
    processor.__class__ = Qwen2VLProcessor
    return processor


def load_processor(folder: Path) -> Any:
    """The edit pipeline's ``processor`` from a model's ``processor`` folder (tokenizer files and
    ``preprocessor_config.json``), with Qwen2-VL's PIL image processor and no video processor
    (:func:`image_only_processor`: no torchvision needed)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    return image_only_processor(
        Qwen2VLImageProcessorPil.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    )


def save_processor(processor: Any, folder: Path) -> None:
    """Write ``processor``'s tokenizer and image processor to ``folder`` as a model's ``processor``
    folder (``Qwen2VLProcessor.save_pretrained`` fails on the missing video processor)."""
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)


def normalize_edit_latents(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents [B, 16, F, h, w] -> ``(z - latents_mean) / latents_std`` per channel, the
    operations of ``QwenImageEditPlusPipeline._encode_vae_image`` (bit for bit)."""
    channels = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
    std = torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
    return (z - mean) / std


def _area_size(width: int, height: int, area: int) -> tuple[int, int]:
    """The edit pipeline's (width, height) for an image of ``width`` x ``height`` scaled to about
    ``area`` pixels, sides multiples of 32 (``calculate_dimensions``)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    new_width, new_height = calculate_dimensions(area, width / height)
    return int(new_width), int(new_height)


class QwenImageEditEncoder(QwenImageEncoder):
    """Qwen-Image-Edit-2509/2511 encoder; outputs the batch keys :class:`QwenImageEditAdapter` reads."""

    text_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer", "processor")
    text_uses_references: ClassVar[bool] = True

    @classmethod
    def prune_text_encoder(cls, component: str, model: torch.nn.Module) -> None:
        """Qwen2.5-VL without its vocabulary head; its vision tower stays: the prompts carry the
        reference images."""
        from flowtune.encoders.prune import drop_output_head

        drop_output_head(model)

    @classmethod
    def pipeline_components(cls, model_dir: Path, without: Iterable[str]) -> dict[str, Any]:
        """The ``processor``, loaded by :func:`load_processor` (no torchvision needed)."""
        if "processor" in without:
            return {}
        return {"processor": load_processor(Path(model_dir) / "processor")}

    @torch.no_grad()
    def encode_images(
        self, images: list[Image.Image], generators: list[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        """B same-sized RGB images [H, W] (targets or references) -> ``{"image_latents":
        [B, 16, H/8, W/8]}``, normalised as the edit pipeline normalises its references."""
        pixels = self.pipe.image_processor.preprocess(images).to(self.device, dtype=self.dtype)
        dist = self.pipe.vae.encode(pixels[:, :, None]).latent_dist
        z = dist.sample(generator=generators) if self.settings.latent_dist == "sample" else dist.mode()
        return {"image_latents": normalize_edit_latents(self.pipe.vae, z)[:, :, 0]}

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], references: Sequence[Sequence[Image.Image]] | None = None
    ) -> dict[str, list[torch.Tensor]]:
        """B instructions with their reference images (1 to 3 RGB images each) ->
        ``{"text_embeddings": B tensors [L_i, D]}``, each as ``QwenImageEditPlusPipeline`` encodes
        the instruction with those images (one at a time, unpadded).

        Raises:
            ValueError: no references (the embeddings depend on them).
        """
        if references is None or len(references) != len(prompts):
            raise ValueError(
                "Qwen-Image-Edit's prompt embeddings depend on the reference images: give each "
                "prompt its references"
            )
        rows = []
        for prompt, images in zip(prompts, references, strict=True):
            condition = [self.condition_image(image) for image in images]
            text, mask = self.pipe.encode_prompt(
                prompt=[prompt],
                image=condition,
                device=self.device,
                max_sequence_length=self.settings.max_sequence_length,
            )
            rows += unpadded(text, mask)
        return {"text_embeddings": rows}

    def condition_image(self, image: Image.Image) -> Image.Image:
        """A reference as the edit pipeline hands it to Qwen2.5-VL: resized (no crop) to about
        384 x 384 pixels of area (``CONDITION_IMAGE_SIZE``), sides multiples of 32."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE

        width, height = _area_size(image.width, image.height, CONDITION_IMAGE_SIZE)
        return self.pipe.image_processor.resize(image, height, width)

    # -- reference images ---------------------------------------------------------------------

    def control_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the edit pipeline encodes a ``width`` x ``height`` reference at:
        about 1024 x 1024 pixels of area, the aspect ratio kept, sides multiples of 32."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import VAE_IMAGE_SIZE

        return _area_size(width, height, VAE_IMAGE_SIZE)

    def prepare_control(self, image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
        """``image`` resized (no crop) to ``size`` = (width, height) with the pipeline's image
        processor, as the pipeline resizes a reference before its VAE (for ``match_target`` too:
        ``size`` is then the target's bucket)."""
        return self.pipe.image_processor.resize(image, size[1], size[0])

    @classmethod
    def reference_inputs(
        cls, pipe: Any, images: list[Image.Image], height: int, width: int, control_resize: str = "pipeline"
    ) -> dict[str, Any]:
        """``QwenImageEditPlusPipeline``'s ``image`` argument: the references (1 to 3), resized to
        (width, height) first under ``match_target``, as training resized them.

        Raises:
            ValueError: more than three references.
        """
        if not 1 <= len(images) <= MAX_REFERENCES:
            raise ValueError(
                f"Qwen-Image-Edit takes 1 to {MAX_REFERENCES} reference images, got {len(images)}"
            )
        if control_resize == "match_target":
            images = [pipe.image_processor.resize(image, height, width) for image in images]
        return {"image": list(images)}
