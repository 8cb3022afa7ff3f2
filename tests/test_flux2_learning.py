"""Does FLUX.2 LoRA training learn?  Four image/caption pairs, trained with `Trainer` through the
FLUX.2 adapter; then each caption, sampled through diffusers' Flux2Pipeline with the saved LoRA,
must land nearest its own image (compared in the cached, patchified and normalized latent space,
which is the space Flux2Pipeline denoises in)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowtune.data.synthetic import make_shapes_dataset
from tests.helpers import nearest_targets, train_learning_run, wide_tiny_model

TEXT_TOKENS = 48  # the tiny Mistral's system message takes ~30 tokens before the caption
# FLUX.2's blocks share their modulation (shift, scale, gate), computed once from the timestep and
# guidance.  In a random model the gates are near zero, which mutes every attention and
# feed-forward branch, so LoRAs on those alone hardly move the output; a trained FLUX.2 has open
# gates.  The test also adapts the modulation layers so the tiny model can open them.
MODULATION_TOO = (
    ", target_modules: [attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, attn.add_q_proj, attn.add_k_proj,"
    " attn.add_v_proj, attn.to_add_out, ff.linear_in, ff.linear_out, ff_context.linear_in,"
    " ff_context.linear_out, attn.to_qkv_mlp_proj, 'single_transformer_blocks.*.attn.to_out',"
    " double_stream_modulation_img.linear, double_stream_modulation_txt.linear,"
    " single_stream_modulation.linear]"
)


# FLUX.2 has no pooled text embedding: the caption reaches the image only through attention to the
# text tokens, ~31 of which are the system message and chat markup, the same for every caption.
# With transformers' default init the tiny Mistral hardly mixes tokens, only the ~6 caption words
# differed between captions, and the LoRA learned to ignore the text (samples equal to 4 decimals
# for all captions); the tiny Mistral is therefore initialized wider (flowtune.families.flux2.tiny.MISTRAL_INIT_STD).


@pytest.mark.slow
def test_flux2_lora_training_makes_each_caption_sample_its_own_image(tmp_path: Path) -> None:
    from diffusers import Flux2Pipeline

    model = wide_tiny_model("flux2", tmp_path)
    make_shapes_dataset(tmp_path / "data", 4, seed=5)
    result, data = train_learning_run(
        tmp_path, model, "flux2", tmp_path / "data", sequence_length=TEXT_TOKENS, lora_extra=MODULATION_TOO
    )
    targets = torch.stack([data[i]["image_latents"] for i in range(len(data))]).flatten(1)
    captions = [data[i]["caption"] for i in range(len(data))]
    assert len(set(captions)) == 4

    def sample(pipe: Flux2Pipeline, i: int) -> torch.Tensor:
        tokens = pipe(
            prompt=captions[i],
            height=64,
            width=64,
            num_inference_steps=20,
            max_sequence_length=TEXT_TOKENS,
            # The guidance the LoRA was trained with (the adapter's guidance_scale default, 3.5),
            # not Flux2Pipeline's 4.0: the tiny model only knows the guidance embedding of 3.5.
            guidance_scale=3.5,
            generator=torch.Generator().manual_seed(0),  # the same starting noise for every caption
            output_type="latent",
        ).images  # [1, 16, 128]: the packed 4 x 4 grid of patchified, normalized latents
        return tokens.permute(0, 2, 1).reshape(1, 128, 4, 4).flatten(1)

    nearest = nearest_targets(Flux2Pipeline, model, result.final_dir, targets, sample)
    assert nearest == [0, 1, 2, 3], f"captions {captions} sampled nearest to images {nearest}"
