"""Does LoRA training learn?  Four image/caption pairs, trained with `Trainer`, then each caption
sampled through diffusers' FluxPipeline with the saved LoRA must land nearest its own image.

Each data seed's training takes most of its test's time, and a model this small gains nothing from
a second torch thread (it only spins).  So the runs use one thread each, and the last seed's run
goes on in a second process while the first seed's trains here; both are the same
:func:`tests.helpers.train_learning_run`, with the same checks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flowtune.data.loader import CachedDataset
from flowtune.data.synthetic import make_shapes_dataset
from tests.helpers import (
    LEARNING_SEQUENCE_LENGTH,
    REPO,
    nearest_targets,
    train_learning_run,
    wide_tiny_model,
)

SEEDS = [5, 11]


def train(root: Path, data_seed: int) -> Path:
    """The learning run on the four shapes of ``data_seed`` in ``root`` (one torch thread);
    returns the tiny model's directory."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = wide_tiny_model("flux", root)
        make_shapes_dataset(root / "data", 4, seed=data_seed)
        train_learning_run(root, model, "flux", root / "data")
    finally:
        torch.set_num_threads(threads)
    return model


@pytest.fixture(scope="module")
def background(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The last seed's run in a second process, started when the first test of this module does
    (only if the last seed's test was selected); yields its directory and process."""
    if not any(f"[{SEEDS[-1]}]" in item.name for item in request.session.items if item.path == request.path):
        yield None
        return
    root = tmp_path_factory.mktemp(f"learning-{SEEDS[-1]}")
    script = f"from pathlib import Path; from tests.test_train_learning import train; train(Path({str(root)!r}), {SEEDS[-1]})"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(root / "output.txt", "w") as log:
        process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        yield root, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("data_seed", SEEDS)
def test_lora_training_makes_each_caption_sample_its_own_image(
    tmp_path: Path, background, data_seed: int
) -> None:
    from diffusers import FluxPipeline

    if data_seed == SEEDS[-1]:
        root, process = background
        # train_learning_run checked there that the loss fell by 15% or more.
        assert process.wait(timeout=900) == 0, (root / "output.txt").read_text()[-5000:]
        model = root / "tiny-flux"
    else:
        root = tmp_path
        model = train(root, data_seed)
    data = CachedDataset(root / "cache")
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

    nearest = nearest_targets(FluxPipeline, model, root / "run" / "final", targets, sample)
    assert nearest == [0, 1, 2, 3], f"captions {captions} sampled nearest to images {nearest}"
