"""FLUX.1's quantization choices (``FamilySpec.quantize_skip`` / ``encoder_quantize_skip``); FLUX.1
Kontext has the same transformer and text encoders."""

# Kept in model.dtype under model.quantize: the timestep/guidance/pooled-text embedders, the image
# and text input projections, and the output norm and projection (under 1% of FLUX.1's weights).
# The per-block modulation layers (norm1.linear, ...: 2.1B of 12B weights) are quantized.
QUANTIZE_SKIP = ("time_text_embed", "x_embedder", "context_embedder", "norm_out", "proj_out")

# model.encoder_quantize: FLUX.1 quantizes T5 (text_encoder_2; 4.7B weights, all its linear layers:
# T5EncoderModel has no output head, and its embedding and norms are not linear layers) and keeps
# CLIP-L (text_encoder, 0.12B) as loaded.
ENCODER_QUANTIZE_SKIP = (("text_encoder_2", ()),)
