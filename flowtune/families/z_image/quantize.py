"""Z-Image's quantization choices (``FamilySpec.quantize_skip`` / ``encoder_quantize_skip``)."""

# Kept in model.dtype under model.quantize: the timestep and caption embedders (diffusers already
# keeps those two out of its layerwise casting as precision sensitive), the 2x2 patch embedder and
# the final layer (its projection and modulation): together under 0.2% of Z-Image's 6B weights.
# The blocks' own modulation layers (adaLN_modulation) are quantized, as FLUX.1's are.
QUANTIZE_SKIP = ("t_embedder", "cap_embedder", "all_x_embedder", "all_final_layer")

# model.encoder_quantize: the Qwen3-4B text encoder, all of its linear layers (Z-Image ships the
# base Qwen3Model, without a language-model head).
ENCODER_QUANTIZE_SKIP = (("text_encoder", ()),)
