"""HunyuanVideo 1.5's quantization choices (``FamilySpec.quantize_skip`` / ``encoder_quantize_skip``)."""

# Kept in model.dtype under model.quantize: the input projections of the image, Qwen2.5-VL
# (context_embedder: its token refiner too) and ByT5 embeddings, the timestep embedder, and the
# output norm and projection: small, and sensitive to rounding.  (The latents' patch embedding,
# x_embedder, is a Conv3d, which model.quantize never touches.)  The 54 double-stream blocks,
# modulation layers included, are quantized.
QUANTIZE_SKIP = (
    "image_embedder",
    "context_embedder",
    "context_embedder_2",
    "time_embed",
    "norm_out",
    "proj_out",
)

# model.encoder_quantize: the Qwen2.5-VL-7B text model (text_encoder, 7B, a bare text model: no
# vision tower or LM head to skip); the small ByT5 (text_encoder_2) stays in model.dtype.
ENCODER_QUANTIZE_SKIP = (("text_encoder", ()),)
