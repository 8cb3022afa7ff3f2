"""FLUX.2's quantization choices (``FamilySpec.quantize_skip`` / ``encoder_quantize_skip``)."""

# FLUX.2 keeps, besides the embedders and the output layers, its three modulation layers: shared
# by every block (one error reaches all of them), and under 2% of the weights.
QUANTIZE_SKIP = (
    "time_guidance_embed",
    "double_stream_modulation_img",
    "double_stream_modulation_txt",
    "single_stream_modulation",
    "x_embedder",
    "context_embedder",
    "norm_out",
    "proj_out",
)

# FLUX.2 quantizes all of Mistral3 (text_encoder) that encoding keeps: its vision tower and
# projector, its vocabulary head and the layers after hidden state 30 are dropped as it loads
# (Flux2Encoder.prune_text_encoder).
ENCODER_QUANTIZE_SKIP = (("text_encoder", ()),)
