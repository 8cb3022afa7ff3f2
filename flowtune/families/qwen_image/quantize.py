"""Qwen-Image's quantization choices (``FamilySpec.quantize_skip`` / ``encoder_quantize_skip``)."""

# Kept in model.dtype under model.quantize: the timestep embedder, the image and text input
# projections (txt_norm is an RMSNorm, not a linear layer) and the output norm and projection
# (well under 1% of Qwen-Image's 20B weights).  The per-block modulation layers (img_mod, txt_mod)
# are quantized.
QUANTIZE_SKIP = ("time_text_embed", "img_in", "txt_in", "norm_out", "proj_out")

# model.encoder_quantize: Qwen-Image quantizes all of Qwen2.5-VL-7B (text_encoder) that encoding
# keeps: its vision tower and output head are dropped as it loads
# (QwenImageEncoder.prune_text_encoder).
ENCODER_QUANTIZE_SKIP = (("text_encoder", ()),)
