"""FLUX.2 [klein]'s quantization choices (``FamilySpec.quantize_skip`` / ``encoder_quantize_skip``)."""

from flowtune.families.flux2.quantize import QUANTIZE_SKIP as FLUX2_QUANTIZE_SKIP

# The transformer: FLUX.2 [dev]'s choices (embedders, the three shared modulation layers, the
# output layers); klein has no guidance embedder, and the pattern that would cover it is harmless.
QUANTIZE_SKIP = FLUX2_QUANTIZE_SKIP

# model.encoder_quantize quantizes all of Qwen3 (text_encoder) that encoding keeps: its vocabulary
# head and the layers after hidden state 27 are dropped as it loads (the inherited
# Flux2Encoder.prune_text_encoder).
ENCODER_QUANTIZE_SKIP = (("text_encoder", ()),)
