"""What a model family is to flowtune: :class:`FamilySpec`, one per package under
:mod:`flowtune.families` (kept apart from the registry so that the family packages can import it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

GUIDER = "guider"
"""``FamilySpec.guidance_argument`` of pipelines that take their classifier-free guidance scale
from their ``guider`` component instead of a ``__call__`` argument (HunyuanVideo 1.5)."""


@dataclass(frozen=True)
class FamilySpec:
    """How flowtune handles one model family.

    Attributes:
        name: The recipe's ``model.family`` value, e.g. ``"flux"``.
        description: One line for ``flowtune`` listings.
        adapter: The :func:`flowtune.flow_matching.create_adapter` name of its adapter.
        adapter_class: ``"module:Class"`` of that adapter (a
            :class:`flowtune.flow_matching.ModelAdapter` subclass); ``create_adapter``'s table is
            built from the registered families' ``adapter`` -> ``adapter_class``.
        pipeline_class: The diffusers inference pipeline class (``diffusers.<name>``); a model
            folder of this family names it as ``_class_name`` in its ``model_index.json``.
        transformer_class: The diffusers denoiser class, loaded from subfolder ``transformer``.
        lora_target_modules: Default LoRA targets when ``lora.target_modules`` is not set in the
            recipe: peft suffix names, or ``*`` patterns over full module names.
        spatial_granularity: Image sides (pixels) must be multiples of this.
        tiny_builder: ``"module:function"`` writing an offline tiny random pipeline in diffusers
            format; called as ``fn(out_dir: Path, seed: int) -> None``.
        tiny_variants: ``(name, "module:function")`` pairs: tiny builders of the family's other
            checkpoint kinds (an image-to-video or two-expert pipeline), called like
            ``tiny_builder``; ``flowtune make-tiny FAMILY DIR --variant NAME``.
        encoder: ``"module:Class"`` of the family's :class:`flowtune.encoders.FamilyEncoder`,
            which ``flowtune preprocess`` uses to turn images and captions into cached tensors.
        lora_original_names: ``"module:attribute"`` of the family's
            :class:`flowtune.interop.naming.OriginalNaming`: how its diffusers LoRA modules are
            named (and fused) in the original checkpoint layout that kohya sd-scripts and ComfyUI
            use (``flowtune export --format kohya|comfyui``).  None: the family has no such export.
        reference_images: The family can condition on reference (control) images besides the
            caption (image editing: FLUX.1 Kontext, FLUX.2): datasets can be edit pairs,
            preprocess then caches the references' latents, and sampling takes ``--image``.
        references_optional: The family also generates from the caption alone (FLUX.2), so
            plain image datasets and sampling without ``--image`` work too; otherwise (FLUX.1
            Kontext) every example and every sample needs its reference.
        first_frame_images: A video family whose image-to-video checkpoints (a pipeline class of
            ``other_pipeline_classes``, or the one the encoder's
            :meth:`~flowtune.encoders.FamilyEncoder.pipeline_class_name` picks for first frames
            of a folder that does both) start each clip from a given first frame:
            ``flowtune sample --image FILE`` and ``validation.images`` give it, through the
            encoder's :meth:`~flowtune.encoders.FamilyEncoder.reference_inputs`; text-to-video
            checkpoints sample without.  Training takes the first frame from each clip itself
            (``flow.i2v_prob``), so datasets stay plain clips.
        other_pipeline_classes: Further ``model_index.json`` ``_class_name`` values of model
            folders that hold this family's model (checkpoints saved by another pipeline class
            with the same components).
        block_lists: The transformer's block ``ModuleList`` attributes, in forward order, each
            with the ``config.json`` key of its length, e.g. ``(("transformer_blocks",
            "num_layers"), ...)``: what ``train.block_offload`` streams, and how many blocks a
            model has before it is loaded.  Empty: the family has no block offload.
        quantize_skip: Linear layers of the transformer that ``model.quantize`` keeps in
            ``model.dtype``: full module names or ``*`` globs over them, a match covering the
            module's children (:func:`flowtune.memory.quantize.matches_any`).  Typically the
            embedders and the final norm and projection: small, and sensitive to rounding.
        encoder_quantize_skip: The text encoders that ``model.encoder_quantize`` quantizes, as
            ``(pipeline component, patterns)`` pairs: the component's linear layers but those the
            patterns name (as in ``quantize_skip``) are quantized.  Components not listed (e.g. a
            small CLIP) stay in ``model.dtype``.  Empty: the family's encoders are never quantized.
        component_sources: ``(hub id, hub id)`` pairs: Hugging Face Hub models of this family
            whose text encoders and VAE are those of the second model, for the bundled component
            configs that ``flowtune plan`` sizes phases with (:mod:`flowtune.memory.phases`).
        guidance_argument: The keyword of the pipeline's ``__call__`` that flowtune's guidance
            (``validation.guidance``, ``flowtune sample --guidance``) sets: ``guidance_scale``
            (FLUX's distilled guidance, or classifier-free guidance where the pipeline does it),
            ``true_cfg_scale`` (Qwen-Image's classifier-free guidance); or :data:`GUIDER`: the
            pipeline's ``__call__`` takes none, and its ``guider`` component (diffusers'
            ``ClassifierFreeGuidance``) is replaced by a copy with that ``guidance_scale``
            (:meth:`FamilySpec.guidance_inputs`).
        guidance: The guidance value sampling uses when the recipe or command line gives none.
        adapter_arguments: ``(name, type)`` pairs of the keyword arguments the adapter's
            constructor takes (``model.adapter``), types as ``"float"``, ``"int"``, ``"bool"`` or
            ``"str"``, so that a recipe's ``model.adapter`` is checked without importing torch;
            the family contract test checks them against the constructor.  None: not declared,
            the adapter is imported to check them.
        negative_prompt: The negative prompt of the family's classifier-free guidance when the
            recipe or command line gives none (e.g. ``" "``); validation samples with its cached
            embedding.  None: the family's pipeline takes no negative prompt (guidance-distilled
            FLUX), and giving one is an error.
        implicit_negative_prompt: The negative prompt that the family's pipeline encodes by
            itself for classifier-free guidance while taking none as an argument (its
            ``negative_prompt`` is then None: no ``--negative-prompt``, no
            ``validation.negative_prompt``).  Validation samples without the text encoders, so
            preprocess caches this prompt's embeddings with the validation prompts and validation
            passes them (:meth:`FamilyEncoder.negative_inputs`) as the pipeline would compute them.
            None: the family has no such prompt.
        video_vae: The family's VAE is a video VAE that encodes an image as a one-frame video:
            pixels [B, 3, 1, H, W] in, latents [B, C, 1, H/8, W/8] (Qwen-Image's
            ``AutoencoderKLQwenImage``); ``flowtune plan`` traces it with those shapes.  False:
            an image VAE ([B, 3, H, W] -> [B, C, H/8, W/8]).
        frame_granularity: 0 for an image family.  For a video family, a clip's frame count
            must be ``frame_granularity * n + 1`` (Wan, HunyuanVideo: 4, their VAEs compress
            4 frames into one latent frame after the first): ``data.frames`` is checked against
            it, still images are 1-frame clips, and preprocess encodes clips through
            :meth:`flowtune.encoders.FamilyEncoder.encode_videos` into ``video_latents``
            [C, F', h, w] (h, w: the VAE's latent size) with F' = (frames - 1) / frame_granularity + 1.
        fps: A video family's frame rate (the rate its models were trained at): ``data.fps``
            and ``flowtune sample --fps`` default to it.  0 for an image family.
        lora_loader: ``"module:Class"`` of the diffusers LoRA loader mixin whose LoRA file layout
            and methods (``transformer_name``, ``pack_weights``, ``save_lora_weights``,
            ``lora_state_dict``) flowtune uses for the family's LoRA files, for a pipeline class
            that has none (diffusers 0.42's ``HunyuanVideo15Pipeline``).  None: the pipeline
            class's own (:meth:`lora_class`).
        plan_forward: ``"module:function"`` of a stand-in for the transformer's ``forward``
            that ``flowtune plan`` binds to the model it traces on fake tensors, for a transformer
            whose forward reads its inputs' values (a branch on them, shapes made by boolean
            indexing), which fake tensors cannot give: ``function(model, **forward kwargs)``,
            the same modules and tensor shapes without reading a value.  Training and sampling
            never use it.  None: the plan traces the transformer's own forward.
        transformer_patch: ``"module:function"`` that swaps, in place, parts of the family's
            diffusers transformer for stand-ins of flowtune's that compute the same outputs with
            less memory (an attention processor, an activation module):
            ``function(transformer) -> None``, called as the transformer is built or loaded for
            training, ``flowtune plan`` and sampling (:meth:`patch_transformer`).  Its outputs
            must equal the unpatched model's, which tests/test_family_contract.py checks.  None:
            the transformer as diffusers builds it.
    """

    name: str
    description: str
    adapter: str
    adapter_class: str
    pipeline_class: str
    transformer_class: str
    lora_target_modules: tuple[str, ...]
    spatial_granularity: int
    tiny_builder: str
    encoder: str
    lora_original_names: str | None = None
    reference_images: bool = False
    references_optional: bool = False
    first_frame_images: bool = False
    other_pipeline_classes: tuple[str, ...] = ()
    block_lists: tuple[tuple[str, str], ...] = ()
    quantize_skip: tuple[str, ...] = ()
    encoder_quantize_skip: tuple[tuple[str, tuple[str, ...]], ...] = ()
    component_sources: tuple[tuple[str, str], ...] = ()
    adapter_arguments: tuple[tuple[str, str], ...] | None = None
    guidance_argument: str = "guidance_scale"
    guidance: float = 3.5
    negative_prompt: str | None = None
    implicit_negative_prompt: str | None = None
    video_vae: bool = False
    frame_granularity: int = 0
    fps: int = 0
    lora_loader: str | None = None
    plan_forward: str | None = None
    tiny_variants: tuple[tuple[str, str], ...] = ()
    transformer_patch: str | None = None

    @property
    def pipeline_classes(self) -> tuple[str, ...]:
        """Every ``model_index.json`` ``_class_name`` of a model folder of this family."""
        return (self.pipeline_class, *self.other_pipeline_classes)

    def uses_edit_pairs(self, edit_pairs: bool | None) -> bool:
        """Whether a recipe trains on edit pairs, given its ``data.edit_pairs`` (None = the
        family's default: edit pairs when it cannot do without references)."""
        if edit_pairs is None:
            return self.reference_images and not self.references_optional
        return edit_pairs

    def cached_negative_prompt(self, negative_prompt: str | None) -> str | None:
        """The negative prompt whose embeddings preprocess caches and validation samples with:
        ``negative_prompt`` (the recipe's ``validation.negative_prompt``, which defaults to the
        family's), else the family's ``implicit_negative_prompt``."""
        return negative_prompt if negative_prompt is not None else self.implicit_negative_prompt

    def guidance_inputs(self, pipe: Any, guidance: float) -> dict[str, float]:
        """Set ``guidance`` for the next call of ``pipe`` (the family's pipeline): the keyword
        arguments to pass, or, for :data:`GUIDER` families, none (``pipe.guider`` is replaced by
        a copy with that ``guidance_scale``)."""
        if self.guidance_argument == GUIDER:
            pipe.guider = pipe.guider.new(guidance_scale=guidance)
            return {}
        return {self.guidance_argument: guidance}

    def lora_class(self) -> type:
        """The class whose LoRA methods write and read the family's LoRA files: ``lora_loader``
        where set, else the diffusers pipeline class."""
        if self.lora_loader is not None:
            return _import_object(self.lora_loader)
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def load_adapter_class(self) -> type:
        """Import and return the family's adapter class."""
        return _import_object(self.adapter_class)

    def load_tiny_builder(self, variant: str | None = None) -> Callable[..., Any]:
        """Import and return the tiny-pipeline builder function (of ``variant``, one of
        ``tiny_variants``' names; None: ``tiny_builder``).

        Raises:
            ValueError: the family has no such variant.
        """
        if variant is None:
            return _import_object(self.tiny_builder)
        variants = dict(self.tiny_variants)
        if variant not in variants:
            have = ", ".join(variants) if variants else "none"
            raise ValueError(
                f"model family {self.name!r} has no tiny variant {variant!r} (its variants: {have})"
            )
        return _import_object(variants[variant])

    def load_encoder_class(self) -> type:
        """Import and return the family's encoder class (a ``FamilyEncoder`` subclass)."""
        return _import_object(self.encoder)

    def load_plan_forward(self) -> Any | None:
        """Import and return the family's ``plan_forward`` function (None if it has none)."""
        return _import_object(self.plan_forward) if self.plan_forward else None

    def patch_transformer(self, transformer: Any) -> Any:
        """Apply the family's ``transformer_patch`` to ``transformer`` (a diffusers model of
        ``transformer_class``, before any LoRA or quantization); return it."""
        if self.transformer_patch is not None:
            _import_object(self.transformer_patch)(transformer)
        return transformer

    def load_lora_original_names(self) -> Any | None:
        """Import and return the family's ``OriginalNaming`` (None if it has none)."""
        return _import_object(self.lora_original_names) if self.lora_original_names else None


def _import_object(reference: str) -> Any:
    """The object named by ``"package.module:attribute"``."""
    module, _, attr = reference.partition(":")
    return getattr(import_module(module), attr)
