"""Does Kontext LoRA training learn edits?  Four edit pairs (a shape, and the same shape
recoloured per the instruction), trained with `Trainer` through the Kontext adapter; then each
pair's instruction and source image, sampled through diffusers' FluxKontextPipeline with the saved
LoRA, must land nearer its own target than the other targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from flowtune.data.synthetic import make_edit_pairs_dataset
from tests.helpers import LEARNING_SEQUENCE_LENGTH, nearest_targets, train_learning_run, wide_tiny_model


@pytest.mark.slow
def test_kontext_lora_training_makes_each_edit_land_on_its_own_target(tmp_path: Path) -> None:
    from diffusers import FluxKontextPipeline

    model = wide_tiny_model("flux-kontext", tmp_path)
    make_edit_pairs_dataset(tmp_path / "edits", 4, seed=5)
    result, data = train_learning_run(
        tmp_path, model, "flux-kontext", tmp_path / "edits", data_extra=", control_resize: match_target"
    )
    stems = [Path(data.items[i]["source"]).stem for i in range(len(data))]
    targets = torch.stack([data[i]["image_latents"] for i in range(len(data))]).flatten(1)
    instructions = [data[i]["caption"] for i in range(len(data))]

    def sample(pipe: FluxKontextPipeline, i: int) -> torch.Tensor:
        source = Image.open(tmp_path / "edits" / "control" / f"{stems[i]}.png").convert("RGB")
        packed = pipe(
            prompt=instructions[i],
            image=pipe.image_processor.resize(source, 64, 64),  # as data.control_resize: match_target
            _auto_resize=False,
            height=64,
            width=64,
            max_area=64 * 64,
            num_inference_steps=20,
            max_sequence_length=LEARNING_SEQUENCE_LENGTH,
            generator=torch.Generator().manual_seed(0),  # the same starting noise for every pair
            output_type="latent",
        ).images
        return FluxKontextPipeline._unpack_latents(packed, 64, 64, pipe.vae_scale_factor).flatten(1)

    nearest = nearest_targets(FluxKontextPipeline, model, result.final_dir, targets, sample)
    assert nearest == [0, 1, 2, 3], f"edits {instructions} sampled nearest to targets {nearest}"
