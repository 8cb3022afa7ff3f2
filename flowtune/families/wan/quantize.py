"""Wan 2.1's quantization choices (``FamilySpec.quantize_skip`` / ``encoder_quantize_skip``)."""

# Kept in model.dtype under model.quantize: the condition embedder (the timestep MLP, its
# projection into every block's modulation, and the text projection) and the output projection,
# well under 1% of the weights; the patch embedding is a Conv3d, never quantized.  diffusers keeps
# the same modules out of its layerwise casting (``_skip_layerwise_casting_patterns``).
QUANTIZE_SKIP = ("condition_embedder", "proj_out")

# model.encoder_quantize: UMT5-XXL's encoder (text_encoder, 5.7B weights), all its linear layers
# (UMT5EncoderModel has no output head; its embedding and norms are not linear layers).
ENCODER_QUANTIZE_SKIP = (("text_encoder", ()),)
