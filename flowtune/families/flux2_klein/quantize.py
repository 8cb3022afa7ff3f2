"""FLUX.2 [klein]'s quantization choices (``FamilySpec.quantize_skip`` / ``encoder_quantize_skip``)."""

from flowtune.families.flux2.quantize import QUANTIZE_SKIP as FLUX2_QUANTIZE_SKIP

# The transformer: FLUX.2 [dev]'s choices (embedders, the three shared modulation layers, the
# output layers); klein has no guidance embedder, and the pattern that would cover it is harmless.
QUANTIZE_SKIP = FLUX2_QUANTIZE_SKIP

# model.encoder_quantize quantizes Qwen3 (text_encoder) but its output head: Flux2KleinPipeline
# reads only hidden states, so lm_head (the vocabulary projection; tied to the input embedding in
# Qwen3-4B) never runs, and quantizing it would only slow the load.
ENCODER_QUANTIZE_SKIP = (("text_encoder", ("lm_head",)),)
