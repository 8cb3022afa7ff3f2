"""The encoder interface shared by all families, and the loading it has in common.

An encoder turns cropped RGB images into normalised latents and captions into text-conditioning
tensors, exactly as the family's diffusers pipeline does at inference, so that cached tensors are
what the transformer would see.  It loads only what it needs: the VAE to encode images, the text
encoders and tokenizers to encode captions, never the transformer.

Its :meth:`FamilyEncoder.identity` is computed from file fingerprints and settings without
loading anything, so preprocess can decide that nothing needs encoding in milliseconds.
"""

from __future__ import annotations

import gc
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from flowtune.families import FamilySpec
from flowtune.model_files import fingerprint_components

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class EncoderSettings:
    """The recipe settings that change what an encoder produces.

    Attributes:
        dtype: ``model.dtype``: the dtype the VAE and text encoders run in, and of the outputs.
        max_sequence_length: ``data.max_sequence_length``: text tokens per caption.
        latent_dist: ``data.latent_dist``: ``"mode"`` or ``"sample"`` of the latent distribution.
        variant: ``model.variant``: the weight-file variant to load (None = default files).
        quantize: ``model.encoder_quantize``: the text encoders' linear weights quantized
            (``int8``, ``fp8``, ``nf4``; the family's ``encoder_quantize_skip``), None = as loaded.
    """

    dtype: Literal["bfloat16", "float16", "float32"]
    max_sequence_length: int
    latent_dist: Literal["mode", "sample"]
    variant: str | None = None
    quantize: Literal["int8", "fp8", "nf4"] | None = None


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class FamilyEncoder(ABC):
    """Encodes images and captions for one model family (subclass per family).

    Class attributes a subclass sets:
        image_components: Pipeline subfolders that image encoding loads (their files are
            fingerprinted into the image identity).
        text_components: Pipeline subfolders that caption encoding loads.
        image_fields: ``{name: is_sequence}`` of the tensors :meth:`encode_images` returns
            (``is_sequence``: dim 0 of a per-item tensor has a per-item length).
        text_fields: ``{name: is_sequence}`` of the tensors :meth:`encode_prompts` returns.
        version: Bump when the encoding itself changes, so that old caches are re-encoded.
        text_uses_references: The prompt embeddings depend on the item's reference images too
            (families with ``FamilySpec.reference_images`` whose pipeline runs a vision-language
            text encoder on the prompt *and* the references).  Then preprocess keys a caption's
            text entry by its references' control entry keys as well (image bytes,
            ``data.control_resize``, size) and calls ``encode_prompts(prompts, references)``;
            validation samples with the text encoders loaded (the pipeline encodes each
            validation prompt and the negative prompt with ``validation.images``) instead of
            from cached prompt embeddings.  Its :meth:`prepare_control` must then work with only
            the text components loaded (``match_target`` references are resized for the prompt
            too).  Default False: captions are encoded alone.
        constructor_components: Image components that the family's pipeline constructor reads
            (e.g. the VAE's config), so :meth:`load` loads them for text encoding too, and keeps
            them in CPU memory then.

    The field names are the batch keys the family's flow-matching adapter reads.
    """

    image_components: ClassVar[tuple[str, ...]] = ("vae",)
    text_components: ClassVar[tuple[str, ...]] = ()
    image_fields: ClassVar[dict[str, bool]] = {}
    text_fields: ClassVar[dict[str, bool]] = {}
    version: ClassVar[int] = 1
    text_uses_references: ClassVar[bool] = False
    constructor_components: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        spec: FamilySpec,
        model_dir: Path,
        settings: EncoderSettings,
        device: torch.device | str | None = None,
    ):
        self.spec = spec
        self.model_dir = Path(model_dir)
        self.settings = settings
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype: torch.dtype = getattr(torch, settings.dtype)
        self.pipe: Any = None

    # -- identity -----------------------------------------------------------------------------

    def identity(self) -> dict[str, str]:
        """``{"image": hex, "text": hex}``: what the encoded tensors depend on besides the input.

        The image identity covers the VAE files, dtype, ``latent_dist`` and encoder version; the
        text identity covers the text encoder and tokenizer files, dtype,
        ``max_sequence_length`` and, when set, the text encoders' quantization (so that changing
        it re-encodes the captions; an unquantized identity is what it was before the setting
        existed).  Nothing is loaded.
        """
        common = {"encoder": type(self).__qualname__, "version": self.version, "dtype": self.settings.dtype}
        image = {
            **common,
            "files": fingerprint_components(self.model_dir, self.image_components),
            "latent_dist": self.settings.latent_dist,
        }
        text = {
            **common,
            "files": fingerprint_components(self.model_dir, self.text_components),
            "max_sequence_length": self.settings.max_sequence_length,
        }
        if self.settings.quantize is not None:
            text["quantize"] = self.settings.quantize
        return {"image": _digest(image), "text": _digest(text)}

    def describe(self) -> dict[str, Any]:
        """The settings and component folders, for the cache manifest (human-readable)."""
        return {
            "encoder": type(self).__qualname__,
            "version": self.version,
            "pipeline_class": self.spec.pipeline_class,
            "image_components": list(self.image_components),
            "text_components": list(self.text_components),
            **asdict(self.settings),
        }

    # -- loading ------------------------------------------------------------------------------

    def load(self, *, images: bool, texts: bool) -> None:
        """Load the family pipeline with only the components needed, on ``self.device``.

        Args:
            images: Load the VAE (and the image processor).
            texts: Load the text encoders and tokenizers (quantized per ``settings.quantize``).
        """
        needed = self.constructor_components
        without = ["transformer"]
        if not images:
            without += [name for name in self.image_components if name not in needed]
        if not texts:
            without += self.text_components
        self.pipe = load_pipeline(
            self.spec,
            self.model_dir,
            dtype=self.dtype,
            device=self.device,
            variant=self.settings.variant,
            without=without,
            encoder_quantize=self.settings.quantize if texts else None,
        )
        if not images:  # loaded for the pipeline's constructor only: off the accelerator
            for name in needed:
                getattr(self.pipe, name).to("cpu")

    def unload(self) -> None:
        """Drop the loaded models (and free accelerator memory)."""
        self.pipe = None
        if self.device.type != "cpu":
            # Modules in reference cycles would otherwise hold their accelerator memory until a
            # later collection.  On the CPU the next collection frees them soon enough, and a full
            # collection of a large heap costs more than it saves.
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- encoding -----------------------------------------------------------------------------

    @abstractmethod
    def encode_images(
        self, images: list[Image.Image], generators: list[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        """Encode same-sized RGB images (already cropped to their bucket).

        Args:
            images: B PIL images of one size (H, W), mode RGB.
            generators: B CPU generators, used when ``latent_dist`` is ``"sample"``.

        Returns:
            ``{field: [B, ...]}`` for every field of ``image_fields``, in ``self.dtype``.
        """

    def encode_videos(
        self, clips: list[list[Image.Image]], generators: list[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        """Encode same-shaped clips (video families, ``FamilySpec.frame_granularity`` > 0).

        Args:
            clips: B clips, each F RGB PIL frames of one size (H, W), already cropped to their
                bucket; F = ``frame_granularity * n + 1`` (1 for a still image).
            generators: B CPU generators, used when ``latent_dist`` is ``"sample"``.

        Returns:
            ``{"video_latents": [B, C, F', h, w], ...}`` (h, w: the VAE's latent size, e.g.
            H/8 x W/8 for Wan, H/16 x W/16 for HunyuanVideo 1.5) for every field of
            ``image_fields``, in ``self.dtype``, F' = (F - 1) / frame_granularity + 1.

        Raises:
            NotImplementedError: an image family.
        """
        raise NotImplementedError(f"{type(self).__name__} encodes images, not videos")

    def token_counts(self, prompts: list[str]) -> list[int] | None:
        """Tokens per prompt for the text encoder limited by ``max_sequence_length`` (special
        tokens included), loading only its tokenizer; preprocess warns about captions longer
        than the limit, which the encoder truncates.  None = the family does not check."""
        return None

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Encode B captions: ``{field: [B, ...]}`` for every field of ``text_fields``.

        An encoder with :attr:`text_uses_references` takes a second argument, ``references``: per
        caption, its reference images (RGB PIL images) as the family's pipeline is handed them
        when sampling: the decoded files, or, with ``data.control_resize: match_target``, each
        brought to the target's bucket by :meth:`prepare_control`."""

    @classmethod
    def reference_inputs(
        cls, pipe: Any, images: list[Image.Image], height: int, width: int, control_resize: str = "pipeline"
    ) -> dict[str, Any]:
        """The family pipeline's ``__call__`` arguments for reference images (families with
        ``FamilySpec.reference_images``; image editing).

        Raises:
            ValueError: the family takes no reference images, or not that many.
        """
        raise ValueError(f"{cls.__name__} takes no reference images")

    def control_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the family's pipeline encodes a ``width`` x ``height`` reference
        image at (families with ``FamilySpec.reference_images``; ``data.control_resize:
        pipeline``).

        Raises:
            ValueError: the family takes no reference images.
        """
        raise ValueError(f"{type(self).__name__} takes no reference images")

    def prepare_control(self, image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
        """A reference image brought to ``size`` = (width, height) as the family's pipeline brings
        it there (``mode`` is ``data.control_resize``); needs :meth:`load` with ``images=True``.

        Raises:
            ValueError: the family takes no reference images.
        """
        raise ValueError(f"{type(self).__name__} takes no reference images")

    @classmethod
    def reference_problem(cls, width: int, height: int) -> str | None:
        """Why the family's pipeline would refuse a reference image of ``width`` x ``height``
        pixels (the size it is handed), or None.  Default: any size is taken."""
        return None

    @classmethod
    def pipeline_components(cls, model_dir: Path, without: Iterable[str]) -> dict[str, Any]:
        """Components to load in place of the pipeline's own loading, for components the family
        loads its own way (set on the pipeline after ``from_pretrained``, which skips them);
        ``without`` are the components not being loaded at all.  Default: none."""
        return {}

    @classmethod
    def prune_text_encoder(cls, component: str, model: torch.nn.Module) -> None:
        """Drop in place what the pipeline's caption encoding never runs from text encoder
        ``component`` (a model of ``text_components``), right after it is loaded, before
        ``model.encoder_quantize`` and the move to the accelerator; ``flowtune plan`` sizes the
        pruned model.  The embeddings must stay the pipeline's bit for bit; the pipelines that
        :func:`load_pipeline` returns are used for nothing else (no prompt rewriting with the
        language model).  Tools: :mod:`flowtune.encoders.prune`.  Default: nothing."""
        del component, model  # nothing to drop

    @classmethod
    def pipeline_class_name(cls, spec: FamilySpec, model_dir: Path, first_frames: bool = False) -> str:
        """The diffusers pipeline class that loads ``model_dir`` (:func:`load_pipeline`): the class
        its ``model_index.json`` names when it is one of the family's
        (``FamilySpec.pipeline_classes``), else ``FamilySpec.pipeline_class``.  ``first_frames``:
        the pipeline will start clips from given first frames (``FamilySpec.first_frame_images``);
        a family whose checkpoints do both text- and image-to-video through two pipeline classes
        picks the image-to-video one then."""
        from flowtune.model_files import read_pipeline_class

        class_name = read_pipeline_class(Path(model_dir))
        return class_name if class_name in spec.pipeline_classes else spec.pipeline_class

    def spatial_granularity(self) -> int:
        """Image sides (pixels) that this model folder's pipeline takes whole: multiples of this
        (preprocess buckets with it): :meth:`granularity_for` its ``vae/config.json`` (None
        without one), read without loading weights."""
        config = self.model_dir / "vae" / "config.json"
        vae = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
        return self.granularity_for(self.spec, vae)

    @classmethod
    def granularity_for(cls, spec: FamilySpec, vae_config: dict[str, Any] | None) -> int:
        """The sides' granularity of a checkpoint whose VAE has ``vae_config`` (a model folder's,
        or the one ``flowtune plan`` bundles for a Hub id; None: unknown).  Default
        ``FamilySpec.spatial_granularity``; a family whose checkpoints differ overrides it."""
        del vae_config  # the family's one granularity
        return spec.spatial_granularity

    @classmethod
    @abstractmethod
    def prompt_inputs(cls, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The family pipeline's ``__call__`` arguments that stand for a prompt, from the cached text
        fields (``{field: [B, ...]}`` as :meth:`encode_prompts` returns them), so that the pipeline
        samples without its text encoders."""

    @classmethod
    def negative_inputs(cls, text: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The pipeline's ``__call__`` arguments that stand for a negative prompt, from its cached
        text fields (families with ``FamilySpec.negative_prompt``).  Default: those of
        :meth:`prompt_inputs` with ``negative_`` before each name (``negative_prompt_embeds``,
        ``negative_prompt_embeds_mask``), as diffusers' pipelines name them."""
        return {f"negative_{name}": value for name, value in cls.prompt_inputs(text).items()}


def first_frame_inputs(pipe: Any, images: list[Image.Image]) -> dict[str, Any]:
    """A video family's image-to-video ``__call__`` argument for the clip's first frame
    (``FamilySpec.first_frame_images``, :meth:`FamilyEncoder.reference_inputs`): ``{"image":
    image}``, which the pipeline sizes to the clip as it does outside flowtune.

    Raises:
        ValueError: ``pipe`` is a text-to-video pipeline (its ``__call__`` takes no ``image``),
            or not one image.
    """
    import inspect

    if "image" not in inspect.signature(type(pipe).__call__).parameters:
        raise ValueError(
            f"{type(pipe).__name__} is a text-to-video model: a first frame (--image, "
            "validation.images) needs an image-to-video checkpoint"
        )
    if len(images) != 1:
        raise ValueError(f"a clip starts from one first frame, got {len(images)} images")
    return {"image": images[0]}


def load_pipeline(
    spec: FamilySpec,
    model_dir: Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    variant: str | None = None,
    transformer: torch.nn.Module | None = None,
    without: Iterable[str] = (),
    encoder_quantize: str | None = None,
    first_frames: bool = False,
    trained_as: str = "transformer",
) -> Any:
    """The family's diffusers pipeline from ``model_dir`` on ``device``, progress bars off: the
    class the folder was saved by (its model_index.json) when it is one of the family's
    (``FamilySpec.pipeline_classes``), else ``FamilySpec.pipeline_class``
    (:meth:`FamilyEncoder.pipeline_class_name`).  Its text encoders are pruned of what caption
    encoding never runs (:meth:`FamilyEncoder.prune_text_encoder`) as they are loaded, and its
    transformers patched as training patches them (``FamilySpec.patch_transformer``).

    Args:
        transformer: Use this transformer instead of loading ``model_dir/transformer`` (a full
            fine-tune, or the model being trained).
        without: Components not to load (``transformer`` for encoding; ``text_encoder``, ...
            for validation, which uses cached prompt embeddings instead).
        encoder_quantize: ``model.encoder_quantize``: quantize the family's text encoders
            (``FamilySpec.encoder_quantize_skip``) after loading, layer by layer on ``device``.
        first_frames: The pipeline will start clips from given first frames (``flowtune sample
            --image``, ``validation.images``), which may pick another class.
        trained_as: The pipeline component that ``transformer`` is (``transformer_2``: the
            low-noise expert of a two-expert pipeline, :mod:`flowtune.experts`); the other
            transformers are loaded from ``model_dir``.

    Raises:
        FlowtuneError: ``model_dir`` holds another family's pipeline (its model_index.json).
    """
    import diffusers

    from flowtune.model_files import check_model_family
    from flowtune.quiet import quiet_libraries

    check_model_family(Path(model_dir), spec)  # another family's folder: one line, before loading
    quiet_libraries()
    without = list(without)
    # The folder's own class when it is one of the family's (FamilySpec.other_pipeline_classes:
    # e.g. an image-to-video checkpoint, which diffusers refuses to load as the text-to-video
    # pipeline for its extra components), or the one the encoder picks for first frames.
    encoder_class = spec.load_encoder_class()
    pipeline_class = getattr(
        diffusers, encoder_class.pipeline_class_name(spec, Path(model_dir), first_frames)
    )
    components = encoder_class.pipeline_components(Path(model_dir), without)
    # The family's own components are set after loading: diffusers refuses a component of another
    # class than model_index.json names (FLUX.2 [dev]'s tokenizer is a PixtralProcessor).
    kwargs: dict[str, Any] = {"dtype": dtype, **dict.fromkeys([*without, *components])}
    if transformer is not None:
        kwargs[trained_as] = transformer
    if variant is not None:
        kwargs["variant"] = variant
    pipe = pipeline_class.from_pretrained(model_dir, **kwargs)
    pipe.register_modules(**components)
    for name in encoder_class.text_components:
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            encoder_class.prune_text_encoder(name, model)
    for component in pipe.components.values():  # both experts of a two-expert pipeline
        if isinstance(component, getattr(diffusers, spec.transformer_class)):
            spec.patch_transformer(component)
    pipe.set_progress_bar_config(disable=True)
    if encoder_quantize is not None:
        from flowtune.memory.quantize import quantize_text_encoders

        quantize_text_encoders(pipe, encoder_quantize, spec.encoder_quantize_skip, device)
    if getattr(transformer, "flowtune_block_offload", None) is None:
        return pipe.to(device)
    # The model being trained with train.block_offload: its blocks' weights must stay in CPU
    # memory (moving them would put the whole model on the device); the rest is already there.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and component is not transformer:
            component.to(device)
    return pipe


def create_encoder(
    spec: FamilySpec, model_dir: Path, settings: EncoderSettings, device: torch.device | str | None = None
) -> FamilyEncoder:
    """The family's encoder (``FamilySpec.encoder``) for the model files in ``model_dir``."""
    return spec.load_encoder_class()(spec, model_dir, settings, device)
