"""Helpers shared by the tests that run the ``flowtune`` command line as a user does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# T5 tokens per caption in the learning tests (train_learning_run and their sampling).
LEARNING_SEQUENCE_LENGTH = 32


def flowtune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``python -m flowtune ARGS`` offline in a subprocess; returns the completed process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "flowtune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: exit status 2, no traceback, one line on stderr holding every fragment."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    message = result.stderr.strip()
    assert message.count("\n") == 0, f"expected one line, got:\n{message}"
    for fragment in fragments:
        assert fragment in message, message


def wide_tiny_model(family: str, root: Path) -> Path:
    """The tiny pipeline of ``family`` with a transformer as wide as a latent token: hidden size 64
    for FLUX.1 and Kontext (tokens of 16 x 2 x 2 features), 128 for FLUX.2 (32 x 2 x 2).

    A FLUX transformer's prediction is ``proj_out`` of its hidden state, so with hidden 32 it spans
    only part of a token's dimensions and can never fit the velocity; real models (hidden 3072 and
    6144) have no such limit.  The token width is the smallest that has none either.
    """
    import torch

    from flowtune.tiny import make_tiny, tiny_flux2_transformer, tiny_flux_transformer

    model = make_tiny(family, root / f"tiny-{family}")
    torch.manual_seed(0)
    transformer = (
        tiny_flux2_transformer(hidden=128) if family == "flux2" else tiny_flux_transformer(hidden=64)
    )
    shutil.rmtree(model / "transformer")
    transformer.save_pretrained(model / "transformer")
    return model


def save_image(
    path: Path, size: tuple[int, int] = (32, 24), colour: tuple[int, int, int] = (200, 30, 30)
) -> Path:
    """A plain RGB image file (format from the suffix), parent folders created."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write(path: Path, data: str | bytes) -> Path:
    """A file with ``data``, parent folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def tiny_flux_inputs(seed: int = 0, text_tokens: int = 16) -> dict:
    """Inputs of the tiny FLUX.1 transformer (``flowtune.tiny``): 16 image tokens of 64 features
    ([1, 16, 64]), ``text_tokens`` T5 tokens of 32, pooled [1, 32], guidance, ``return_dict=False``;
    image ids on a 4 x 4 grid."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(16, 3)
    ids[:, 1] = torch.arange(16) // 4
    ids[:, 2] = torch.arange(16) % 4
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, text_tokens, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": ids,
        "txt_ids": torch.zeros(text_tokens, 3),
        "return_dict": False,
    }


def train_learning_run(
    root: Path,
    model: Path,
    family: str,
    data: Path,
    data_extra: str = "",
    sequence_length: int = LEARNING_SEQUENCE_LENGTH,
    lr: float = 1e-2,
    lora_extra: str = "",
) -> tuple:
    """The learning tests' run: LoRA rank 16 on the data at 64 px, always conditioned, uniform
    noise levels, 1000 steps of batch 4 at ``lr``, ``sequence_length`` text tokens.  Checks the
    loss fell by 15% or more.

    Returns:
        The :class:`TrainResult` and the run's :class:`CachedDataset`.
    """
    from rich.console import Console

    from flowtune.data.cache import preprocess
    from flowtune.data.loader import CachedDataset
    from flowtune.recipe import load_recipe
    from flowtune.train.metrics import read_metrics
    from flowtune.train.trainer import Trainer

    (root / "recipe.yaml").write_text(
        f"model: {{family: {family}, pretrained: '{model}', dtype: float32}}\n"
        f"lora: {{rank: 16, alpha: 16{lora_extra}}}\n"
        f"data: {{source: '{data}', cache_dir: '{root / 'cache'}', resolution: 64,"
        f" max_sequence_length: {sequence_length}{data_extra}}}\n"
        # Always conditioned (no caption dropout), noise levels uniform over [0, 1].
        "flow: {cfg_dropout_prob: 0.0, timestep_sampling: uniform, flow_shift: 1.0}\n"
        f"train: {{output_dir: '{root / 'run'}', max_steps: 1000, batch_size: 4, seed: 0,"
        " mixed_precision: 'no', checkpoint_every: 1000, log_every: 100}\n"
        f"optimizer: {{lr: {lr}, weight_decay: 0.0}}\n"
        "lr_scheduler: {name: constant}\n"
    )
    recipe = load_recipe(root / "recipe.yaml")
    preprocess(recipe, console=Console(quiet=True))
    result = Trainer(recipe, console=Console(quiet=True)).run()
    losses = [r["loss"] for r in read_metrics(root / "run" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.85 * losses[0]
    return result, CachedDataset(root / "cache")


def nearest_targets(
    pipeline_class: type, model: Path, lora_dir: Path, targets: Any, sample: Callable
) -> list[int]:
    """The learning tests' check: load ``pipeline_class`` from ``model`` with the trained LoRA,
    draw one sample per target with ``sample(pipe, i)`` (a flat [1, D] latent, from the same
    starting noise for every i) and return, per sample, the index of the nearest of ``targets``
    ([N, D], mean squared distance).  A LoRA that learned the data gives ``[0, 1, ..., N-1]``.
    """
    import torch

    pipe = pipeline_class.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_dir)
    return [int(((sample(pipe, i) - targets) ** 2).mean(dim=1).argmin()) for i in range(len(targets))]
