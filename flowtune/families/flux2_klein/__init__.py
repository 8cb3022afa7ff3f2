"""FLUX.2 [klein] 4B and 9B (``model.family: flux2-klein``): its registry entry, :data:`SPEC`.

FLUX.2 with a Qwen3 text encoder: the same transformer class (smaller, without guidance
embedding), VAE, latent normalization, reference-image handling, LoRA targets, block lists and
naming tables as :mod:`flowtune.families.flux2`; its own :mod:`.adapter` (``Flux2KleinAdapter``),
:mod:`.encoder` (``Flux2KleinEncoder``: Qwen3 prompt encoding), :mod:`.quantize` and :mod:`.tiny`
(``build_tiny_flux2_klein``).

Sampling follows the distilled models' cards (FLUX.2-klein-4B / -9B: ``guidance_scale=1.0``,
4 steps): guidance 1.0 by default.  Flux2KleinPipeline's ``guidance_scale`` is classifier-free
guidance, applied only by the base models (FLUX.2-klein-base-*, ``is_distilled`` false in their
model_index.json; their cards use ~4.0 and 50 steps) and ignored by the distilled ones.  The
pipeline takes no negative prompt: it always guides against the empty prompt, which flowtune
therefore caches for validation (``implicit_negative_prompt``), and ``--negative-prompt`` /
``validation.negative_prompt`` are refused.
"""

from __future__ import annotations

from dataclasses import replace

from flowtune.families.flux2 import SPEC as FLUX2_SPEC
from flowtune.families.flux2_klein.quantize import ENCODER_QUANTIZE_SKIP, QUANTIZE_SKIP

# FLUX.2's entry (LoRA targets, block lists, naming tables, references) with klein's own parts.
SPEC = replace(
    FLUX2_SPEC,
    name="flux2-klein",
    description="FLUX.2 [klein] 4B / 9B: FLUX.2 with a Qwen3 text encoder, no guidance embedding, "
    "step-distilled (4 steps) or base (classifier-free guidance); text-to-image and editing with "
    "reference images",
    adapter="flux2_klein",
    adapter_class="flowtune.families.flux2_klein.adapter:Flux2KleinAdapter",
    pipeline_class="Flux2KleinPipeline",
    tiny_builder="flowtune.families.flux2_klein.tiny:build_tiny_flux2_klein",
    encoder="flowtune.families.flux2_klein.encoder:Flux2KleinEncoder",
    quantize_skip=QUANTIZE_SKIP,
    encoder_quantize_skip=ENCODER_QUANTIZE_SKIP,
    # The base (undistilled) models ship the distilled ones' text encoder and VAE.
    component_sources=(
        ("black-forest-labs/FLUX.2-klein-base-4B", "black-forest-labs/FLUX.2-klein-4B"),
        ("black-forest-labs/FLUX.2-klein-base-9B", "black-forest-labs/FLUX.2-klein-9B"),
    ),
    adapter_arguments=(),  # Flux2KleinAdapter takes none
    guidance=1.0,
    negative_prompt=None,
    implicit_negative_prompt="",
)
