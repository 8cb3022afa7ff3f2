"""Does LoRA training learn?  Four image/caption pairs, trained with `Trainer`, then each caption
sampled through diffusers' FluxPipeline with the saved LoRA must land nearest its own image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowtune.data.synthetic import make_shapes_dataset
from tests.helpers import LEARNING_SEQUENCE_LENGTH, nearest_targets, train_learning_run, wide_tiny_model


@pytest.mark.slow
@pytest.mark.parametrize("data_seed", [5, 11])
def test_lora_training_makes_each_caption_sample_its_own_image(tmp_path: Path, data_seed: int) -> None:
    from diffusers import FluxPipeline

    model = wide_tiny_model("flux", tmp_path)
    make_shapes_dataset(tmp_path / "data", 4, seed=data_seed)
    result, data = train_learning_run(tmp_path, model, "flux", tmp_path / "data")
    targets = torch.stack([data[i]["image_latents"] for i in range(len(data))]).flatten(1)
    captions = [data[i]["caption"] for i in range(len(data))]
    assert len(set(captions)) == 4

    def sample(pipe: FluxPipeline, i: int) -> torch.Tensor:
        packed = pipe(
            captions[i],
            height=64,
            width=64,
            num_inference_steps=20,
            max_sequence_length=LEARNING_SEQUENCE_LENGTH,
            generator=torch.Generator().manual_seed(0),  # the same starting noise for every caption
            output_type="latent",
        ).images
        return FluxPipeline._unpack_latents(packed, 64, 64, pipe.vae_scale_factor).flatten(1)

    nearest = nearest_targets(FluxPipeline, model, result.final_dir, targets, sample)
    assert nearest == [0, 1, 2, 3], f"captions {captions} sampled nearest to images {nearest}"
