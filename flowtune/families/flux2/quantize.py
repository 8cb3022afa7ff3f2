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

# FLUX.2 quantizes Mistral3 (text_encoder) but its Pixtral vision tower and projector, which text
# prompts never run (quantizing them would only slow the load).
ENCODER_QUANTIZE_SKIP = (("text_encoder", ("model.vision_tower", "model.multi_modal_projector")),)
