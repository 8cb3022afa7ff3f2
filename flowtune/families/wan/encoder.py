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

Image-to-video model folders also cache each clip's first-frame condition, as
``WanImageToVideoPipeline.prepare_latents`` computes it from the clip's first frame (called here,
with the clip's frame count):

- Wan 2.1 I2V (a folder with a CLIP ``image_encoder`` and ``image_processor``):
  ``condition_latents`` [16, F', H/8, W/8], the VAE's normalised mode of the first frame followed
  by F - 1 black frames (zeros in [-1, 1]); the causal VAE makes every latent frame of it depend on
  the first frame, so it cannot be taken from the clip's own latents beyond frame 0.  And
  ``image_embeds`` [257, 1280], CLIP's second-to-last hidden state of the first frame
  (``encode_image``).
- Wan 2.2 TI2V (a folder whose ``model_index.json`` has ``expand_timesteps``): ``condition_latents``
  [48, 1, H/16, W/16], the normalised mode of the first frame alone (no image encoder).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from flowtune.encoders.base import EncoderSettings, FamilyEncoder, first_frame_inputs
from flowtune.families.qwen_image.encoder import normalize_latents

if TYPE_CHECKING:
    from PIL import Image

    from flowtune.families.spec import FamilySpec

LATENTS = "video_latents"
TEXT = "text_embeddings"
TEXT_LENGTH = "text_length"
CONDITION = "condition_latents"
IMAGE = "image_embeds"
# Wan 2.1 I2V's image components (WanImageToVideoPipeline): a CLIP vision tower and its processor.
VISION_COMPONENTS = ("image_encoder", "image_processor")


def model_index(model_dir: Path) -> dict[str, Any]:
    """The model folder's ``model_index.json`` ({} without one)."""
    index = Path(model_dir) / "model_index.json"
    return json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}


def has_image_encoder(index: dict[str, Any]) -> bool:
    """Whether a ``model_index.json`` names a CLIP image encoder and processor (Wan 2.1 I2V)."""
    return all(isinstance(index.get(name), list) and index[name][0] for name in VISION_COMPONENTS)


def guard_missing_ftfy() -> None:
    """Make ``WanImageToVideoPipeline`` clean prompts without ftfy as ``WanPipeline`` does.

    diffusers 0.42's ``pipeline_wan_i2v.basic_clean`` calls ``ftfy.fix_text`` whether or not ftfy
    is installed (a NameError without it; diffusers PR #12314), while ``pipeline_wan``'s guards the
    call.  Without ftfy the image-to-video module gets ``pipeline_wan``'s function (the same
    cleaning: ftfy when installed, HTML entities, strip); with ftfy nothing changes.
    """
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v
    from diffusers.utils import is_ftfy_available

    if not is_ftfy_available():
        pipeline_wan_i2v.basic_clean = pipeline_wan.basic_clean


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
    """Wan encoder; outputs the batch keys :class:`WanAdapter` reads.

    Image fields: ``video_latents`` [C, F', h, w]; from image-to-video folders also
    ``condition_latents`` (and, Wan 2.1 I2V, ``image_embeds``), see the module docstring.
    """

    image_components: ClassVar[tuple[str, ...]] = ("vae",)
    text_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")
    image_fields: ClassVar[dict[str, bool]] = {LATENTS: False}
    text_fields: ClassVar[dict[str, bool]] = {TEXT: True, TEXT_LENGTH: False}

    def __init__(
        self,
        spec: FamilySpec,
        model_dir: Path,
        settings: EncoderSettings,
        device: torch.device | str | None = None,
    ):
        super().__init__(spec, model_dir, settings, device)
        index = model_index(self.model_dir)
        self.vision = has_image_encoder(index)  # Wan 2.1 I2V
        self.first_frame = self.vision or bool(index.get("expand_timesteps"))  # caches a condition
        if self.vision:  # instance attributes: the folder decides
            self.image_components = ("vae", *VISION_COMPONENTS)
            self.image_fields = {LATENTS: False, CONDITION: False, IMAGE: False}
        elif self.first_frame:
            self.image_fields = {LATENTS: False, CONDITION: False}

    @classmethod
    def pipeline_class_name(cls, spec: FamilySpec, model_dir: Path, first_frames: bool = False) -> str:
        """The folder's pipeline class (:meth:`FamilyEncoder.pipeline_class_name`), but
        ``WanImageToVideoPipeline`` for first frames on a Wan 2.2 TI2V folder (saved as
        ``WanPipeline`` with ``expand_timesteps``: text-to-video through ``WanPipeline``,
        image-to-video through ``WanImageToVideoPipeline``, as diffusers documents the model)."""
        if first_frames and model_index(model_dir).get("expand_timesteps"):
            return "WanImageToVideoPipeline"
        return super().pipeline_class_name(spec, model_dir, first_frames)

    @classmethod
    def granularity_for(cls, spec: FamilySpec, vae_config: dict[str, Any] | None) -> int:
        """The VAE's spatial factor (its ``scale_factor_spatial``: 8, Wan 2.2 TI2V's 16) times the
        transformer's 2 x 2 patches, as the pipelines round sides: 16, or 32 for TI2V; without a
        VAE config ``FamilySpec``'s 16."""
        if vae_config is None:
            return spec.spatial_granularity
        factor = vae_config.get("scale_factor_spatial") or 8
        return max(spec.spatial_granularity, 2 * int(factor))

    @classmethod
    def pipeline_components(cls, model_dir: Path, without: Iterable[str]) -> dict[str, Any]:
        """None of its own; makes the image-to-video pipeline take prompts without ftfy installed
        (:func:`guard_missing_ftfy`) before any Wan pipeline is loaded."""
        guard_missing_ftfy()
        return {}

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
        out = {LATENTS: normalize_latents(vae, torch.cat(latents)).to(self.dtype)}
        if self.first_frame:
            out[CONDITION] = torch.cat([self.first_frame_condition(clip[0], len(clip)) for clip in clips])
        if self.vision:
            out[IMAGE] = torch.cat([self.first_frame_embeds(clip[0]) for clip in clips])
        return out

    def first_frame_condition(self, frame: Image.Image, frames: int) -> torch.Tensor:
        """The condition latents of a clip of ``frames`` frames starting at ``frame`` (RGB, the
        clip's size), as ``WanImageToVideoPipeline.prepare_latents`` computes them (called
        here, in float32 as the pipeline does; its noise is not drawn): Wan 2.1 I2V [1, 16, F', h, w]
        (the mask channels it puts before them are rebuilt by the adapter), Wan 2.2 TI2V
        [1, 48, 1, h, w]; in ``self.dtype``."""
        from diffusers import WanImageToVideoPipeline

        pipe = self.pipe
        height, width = frame.height, frame.width
        image = pipe.video_processor.preprocess(frame, height=height, width=width)
        channels = pipe.vae.config.z_dim
        latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
        scale = pipe.vae_scale_factor_spatial
        noise = torch.zeros(1, channels, latent_frames, height // scale, width // scale)
        out = WanImageToVideoPipeline.prepare_latents(
            pipe, image.to(self.device, dtype=torch.float32), 1, channels, height, width, frames,
            torch.float32, self.device, None, noise.to(self.device),
        )  # fmt: skip
        condition = out[1] if pipe.config.expand_timesteps else out[1][:, -channels:]
        return condition.to(self.dtype)

    def first_frame_embeds(self, frame: Image.Image) -> torch.Tensor:
        """[1, N, D] CLIP image embeddings of ``frame`` as ``WanImageToVideoPipeline.encode_image``
        computes them (its second-to-last hidden state), in ``self.dtype``."""
        return self.pipe.encode_image(frame, self.device).to(self.dtype)

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

    @classmethod
    def reference_inputs(
        cls, pipe: Any, images: list[Image.Image], height: int, width: int, control_resize: str = "pipeline"
    ) -> dict[str, Any]:
        """The clip's first frame (``FamilySpec.first_frame_images``):
        ``WanImageToVideoPipeline(image=...)``, which resizes it to the clip's size.

        Raises:
            ValueError: a text-to-video checkpoint (its pipeline takes no first frame), or not one
                image.
        """
        return first_frame_inputs(pipe, images)

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens per caption as the pipeline tokenizes it before truncating (``</s>`` included)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir / "tokenizer")
        return [len(tokenizer(prompt_clean(p)).input_ids) for p in prompts]
