"""``flowtune plan`` beyond the training step: the peak GPU memory of preprocess and of sampling.

Like the training step (:mod:`flowtune.memory.plan`), each phase is traced on fake tensors from
configs alone, counting live bytes with :class:`~flowtune.memory.plan.LiveBytes`:

- **preprocess** runs in two halves that are never on the GPU together (``flowtune preprocess``
  frees the text encoders before it loads the VAE): the family's text encoders (its encoder's
  ``text_components`` that are models) encoding ``data.encode_batch_size`` captions of
  ``data.max_sequence_length`` tokens (a CLIP encoder's own 77 at most), pruned as they are
  loaded (:meth:`~flowtune.encoders.FamilyEncoder.prune_text_encoder`), with
  ``model.encoder_quantize`` accounted as for the transformer; then the VAE encoding
  ``data.encode_batch_size`` images at the largest bucket.
- **sampling**: one denoising forward of the transformer (no gradients) at the validation size,
  then the VAE decoding the latents, on top of what stays on the GPU: during training, the
  training state (frozen weights, LoRA, optimizer states: validation images), and the text
  encoders for families whose validation encodes its prompts with their reference images
  (``FamilyEncoder.text_uses_references``), and for a one-expert run (``model.expert: high |
  low``) the other expert, frozen and quantized as the trained one (its weights as the step
  plan's), only its resident part when ``train.block_offload`` streams its blocks (the two
  blocks in flight are those the trained expert's offload leaves room for: one expert runs at a
  time; :func:`flowtune.train.validation.frozen_expert`); for
  ``flowtune sample``, the transformer with its LoRA, the text encoders and the VAE, all on
  the GPU (``--cpu-offload`` keeps one at a time there instead), a one-expert run's other
  expert whole among them; with ``train.block_offload`` (``flowtune sample --block-offload``
  defaults to it), the text encoders alone first, encoding the prompts, then the transformers'
  resident parts, the LoRA and the VAE.

A component's config is a local model folder's ``COMPONENT/config.json``, or one bundled in
``flowtune/memory/configs/components/`` for the Hub ids the bundled recipes name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowtune.families import FAMILIES, FamilySpec

# Hub ids whose pipelines share another's text encoders and VAE (``FamilySpec.component_sources``).
SAME_COMPONENTS = {hub: source for spec in FAMILIES.values() for hub, source in spec.component_sources}


@dataclass
class PhasePlan:
    """The predicted peak of one phase (bytes) and what it is made of.

    Attributes:
        name: ``preprocess``, ``validation`` or ``sample``.
        peak: The phase's peak.
        parts: (what, bytes) lines for the table, e.g. ``("text encoders", n)``.
    """

    name: str
    peak: int
    parts: list[tuple[str, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"peak": self.peak, "parts": dict(self.parts)}


def component_config(pretrained: str, component: str) -> dict[str, Any] | None:
    """The config of ``model.pretrained``'s ``component`` (a local folder's, else bundled), or
    None when there is none (a tokenizer, or an unknown Hub id)."""
    local = Path(pretrained).expanduser()
    if local.is_dir():
        path = local / component / "config.json"
    else:
        hub = SAME_COMPONENTS.get(pretrained, pretrained)
        name = f"{hub.replace('/', '__')}__{component}.json"
        path = Path(str(resources.files("flowtune.memory") / "configs" / "components" / name))
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config if "_class_name" in config or "architectures" in config else None


def build_component(config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """A diffusers (``_class_name``) or transformers (``architectures``) model from its config,
    built in ``dtype`` under whatever fake mode is active, frozen, in eval mode."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        rest = {
            k: v for k, v in config.items() if not k.startswith("_") and k not in ("dtype", "torch_dtype")
        }
        if "_class_name" in config:
            import diffusers

            model = getattr(diffusers, config["_class_name"]).from_config(rest)
        else:
            import transformers

            architecture = rest.pop("architectures")[0]
            model_config = transformers.AutoConfig.for_model(rest.pop("model_type"), **rest)
            model = getattr(transformers, architecture)(model_config)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    model.eval()
    return model


def _quantized_saving(model: nn.Module, mode: str | None, skip: tuple[str, ...]) -> tuple[int, int]:
    """(bytes ``mode`` saves on ``model``'s linear weights, the largest temporaries of
    dequantizing one slice of one of them while it computes); (0, 0) without a mode."""
    from flowtune.memory.plan import dequantization_bytes, quantized_bytes
    from flowtune.memory.quantize import matches_any

    if mode is None:
        return 0, 0
    saved = largest = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not matches_any(name, skip):
            full = module.weight.untyped_storage().nbytes()
            saved += full - quantized_bytes(module.weight.shape, mode)
            largest = max(largest, dequantization_bytes(module.weight, mode))
    return saved, largest


def _mode(fake: bool) -> Any:
    from contextlib import nullcontext

    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode() if fake else nullcontext()


def _text_phase(recipe: Any, spec: FamilySpec, batch: int, fake: bool = True) -> tuple[int, int] | None:
    """(weights as stored, peak) of the family's text encoders encoding ``batch`` captions, or
    None when no text encoder config is known.  ``fake=False`` runs it on real random weights
    (how the tests check the trace)."""
    from flowtune.memory.plan import LiveBytes

    dtype = getattr(torch, recipe.model.dtype)
    encoder_class = spec.load_encoder_class()
    components = list(encoder_class.text_components)
    configs = {c: component_config(recipe.model.pretrained, c) for c in components}
    configs = {c: cfg for c, cfg in configs.items() if cfg is not None}
    if not configs:
        return None
    skips = dict(spec.encoder_quantize_skip)
    mode = recipe.model.encoder_quantize
    saved = transient = 0
    tracker = LiveBytes()
    with _mode(fake), tracker:
        models = {}
        for component, config in configs.items():
            models[component] = build_component(config, dtype)
            encoder_class.prune_text_encoder(component, models[component])  # as load_pipeline does
            if component in skips:
                s, largest = _quantized_saving(models[component], mode, skips[component])
                saved, transient = saved + s, max(transient, largest)
        weights = tracker.current
        for component, model in models.items():
            config = configs[component]
            limit = config.get("max_position_embeddings") or config.get("text_config", {}).get(
                "max_position_embeddings"
            )
            length = min(int(recipe.data.max_sequence_length), int(limit or recipe.data.max_sequence_length))
            ids = torch.zeros(batch, length, dtype=torch.long)
            tracker.reset_peak()
            with torch.no_grad():
                model(input_ids=ids, output_hidden_states=True)
        peak = tracker.peak
    return weights - saved, max(peak, weights) - saved + transient


def _vae_phase(
    recipe: Any,
    spec: FamilySpec,
    batch: int,
    height: int,
    width: int,
    decode: bool,
    fake: bool = True,
    frames: int = 1,
) -> tuple[int, int] | None:
    """(weights, peak) of the VAE encoding ``batch`` images (or decoding their latents); a video
    family's clips of ``frames`` frames (their latents: (frames - 1) / granularity + 1 frames)."""
    from flowtune.memory.plan import LiveBytes

    config = component_config(recipe.model.pretrained, "vae")
    if config is None:
        return None
    dtype = getattr(torch, recipe.model.dtype)
    # A video VAE takes an image as one frame.
    pixel_frames = (frames,) if spec.video_vae else ()
    latent_frames = ((frames - 1) // spec.frame_granularity + 1,) if spec.frame_granularity else pixel_frames
    tracker = LiveBytes()
    with _mode(fake), tracker:
        vae = build_component(config, dtype)
        weights = tracker.current
        with torch.no_grad():
            if decode:
                # The latents' channels and spatial factor (8; 16 for Wan 2.2's VAE), from a
                # 64 x 64 image's encoding, which is done before the decoding's peak is taken.
                one_frame = (1,) * len(pixel_frames)
                probe = vae.encode(torch.zeros(1, 3, *one_frame, 64, 64, dtype=dtype)).latent_dist.mode()
                channels, factor = probe.shape[1], 64 // probe.shape[-1]
                del probe
                tracker.reset_peak()
                vae.decode(
                    torch.zeros(
                        batch, channels, *latent_frames, height // factor, width // factor, dtype=dtype
                    )
                )
            else:
                vae.encode(torch.zeros(batch, 3, *pixel_frames, height, width, dtype=dtype))
        peak = tracker.peak
    return weights, peak


def plan_preprocess(recipe: Any, spec: FamilySpec) -> PhasePlan | None:
    """The peak of ``flowtune preprocess``: its text half or its image half, the larger; None
    when neither the text encoders' nor the VAE's config is known."""
    from flowtune.memory.steps import recipe_bucket, recipe_frames

    batch = int(recipe.data.encode_batch_size)
    width, height = recipe_bucket(recipe, spec)
    text = _text_phase(recipe, spec, batch)
    vae = _vae_phase(recipe, spec, batch, height, width, decode=False, frames=recipe_frames(recipe, spec))
    if text is None and vae is None:
        return None
    parts = []
    if text is not None:
        parts += [
            ("text encoder weights", text[0]),
            (f"text encoders' peak ({batch} captions)", text[1]),
        ]
    if vae is not None:
        parts += [("VAE weights", vae[0]), (f"VAE encoding's peak ({batch} at {width}x{height})", vae[1])]
    return PhasePlan("preprocess", max(text[1] if text else 0, vae[1] if vae else 0), parts)


def plan_sampling(recipe: Any, spec: FamilySpec, trace: Any, step: Any) -> list[PhasePlan]:
    """Validation images during training (when ``validation.prompts`` are set) and
    ``flowtune sample`` on the trained checkpoint (same quantization as training, all components
    on the GPU), from the training trace (``trace``: :class:`flowtune.memory.plan.Trace`, which
    ran the denoising forward at the validation size) and its plan ``step``."""
    from flowtune.memory.steps import validation_frames

    height, width = int(recipe.validation.height), int(recipe.validation.width)
    frames = validation_frames(recipe, spec)
    vae = _vae_phase(recipe, spec, 1, height, width, decode=True, frames=frames)
    size = f"{width}x{height}" + (f", {frames} frames" if spec.frame_granularity else "")
    vae_weights, vae_peak = vae if vae is not None else (0, 0)
    decode = vae_peak - vae_weights
    forward = trace.sampling_peak
    if recipe.model.quantize is not None:  # one slice of a quantized weight dequantized at a time
        from flowtune.memory.plan import dequantization_bytes, frozen_linears

        linears = frozen_linears(trace.model, spec)
        forward += max((dequantization_bytes(m.weight, recipe.model.quantize) for _, m in linears), default=0)
    quantized = step.weights - trace.counts["frozen"]  # <= 0: what model.quantize saves
    plans = []
    text = _text_phase(recipe, spec, 1)
    text_weights, text_run = (text[0], text[1] - text[0]) if text is not None else (0, 0)
    # A one-expert run samples with the other expert too (model.expert=both: already in step).
    other = step.weights if recipe.model.expert in ("high", "low") else 0
    if recipe.validation.prompts:
        static = trace.training_static + quantized - step.offload_saved + vae_weights
        parts = [("training state and VAE", static)]
        if other:
            resident = other - step.offloaded
            static += resident
            parts.append(("other expert" + (", blocks streamed" if step.offloaded else ""), resident))
        peaks = [forward, decode]
        if spec.load_encoder_class().text_uses_references:  # validation encodes its prompts
            static += text_weights
            parts.append(("text encoders", text_weights))
            peaks.append(text_run)
        plans.append(
            PhasePlan(
                "validation",
                static + max(peaks),
                [*parts, (f"denoising forward at {size}", forward), ("VAE decoding", decode)],
            )
        )
    # flowtune sample --block-offload (a checkpoint's default: its train.block_offload): the
    # transformers stream their blocks; the prompts are encoded first, the text encoders alone on
    # the GPU and then freed, unless the family encodes them with their reference images.
    streamed = recipe.train.block_offload is not None
    transformers = trace.counts["frozen"] + quantized + other + trace.counts["trainable"]
    if streamed:
        transformers -= step.offload_saved + (step.offloaded if other else 0)
    what = f"transformer{'s' if other else ''}{' (blocks streamed)' if streamed else ''}, LoRA"
    runs = [(f"denoising forward at {size}", forward), ("VAE decoding", decode)]
    if streamed and not spec.load_encoder_class().text_uses_references:
        static = transformers + vae_weights
        first = ("text encoders, encoding the prompts first", text_weights + text_run)
        peak = max(static + max(forward, decode), first[1])
        plans.append(PhasePlan("sample", peak, [first, (f"{what} and VAE", static), *runs]))
    else:
        static = transformers + text_weights + vae_weights
        peak = static + max(forward, decode, text_run)
        plans.append(PhasePlan("sample", peak, [(f"{what}, text encoders and VAE", static), *runs]))
    return plans
