"""Two-expert pipelines (``model.expert``): one LoRA per denoiser of a mixture-of-experts model.

Some diffusers pipelines split denoising between two transformers at a noise boundary: their
``model_index.json`` names a ``transformer`` (the high-noise expert) and a ``transformer_2`` (the
low-noise expert) and holds ``boundary_ratio`` b; at sampling time ``transformer`` denoises the
steps with ``t >= b * num_train_timesteps`` and ``transformer_2`` the others (Wan 2.2 A14B's
``WanPipeline``: b = 0.875).  With timesteps ``sigma * 1000``, the high expert sees sigma in
[b, 1] and the low one sigma in [0, b).

``model.expert`` trains LoRAs on them:

* ``high``: a LoRA on ``transformer``, sigma sampled within [b, 1];
* ``low``: a LoRA on ``transformer_2``, sigma sampled within [0, b];
* ``both``: one LoRA per expert in one run; each optimizer step trains one expert on its own
  range (:func:`expert_for_step`, :mod:`flowtune.train.experts`).

Sigma is *sampled* within the range (the recipe's ``flow.*`` distribution restricted to it,
``FlowMatchingPipeline(sigma_range=...)``), as musubi-tuner's ``--min_timestep/--max_timestep``
with ``--preserve_distribution_shape`` does, not clamped into it.

A LoRA trained on an expert loads into the pipeline with diffusers' ``load_lora_weights``; the
low expert's with ``load_into_transformer_2=True`` (``WanLoraLoaderMixin``).  The files name the
expert as the other tools do (``..._high_noise.safetensors``, ``..._low_noise.safetensors``).
This module knows no family: it reads the model folder's ``model_index.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flowtune.errors import FlowtuneError

SECOND_TRANSFORMER = "transformer_2"
META_EXPERT = "flowtune.expert"
"""LoRA file metadata: the expert (``high`` / ``low``) it was trained on."""


@dataclass(frozen=True)
class Expert:
    """One denoiser of a two-expert pipeline.

    Attributes:
        name: ``high`` or ``low``.
        component: Its pipeline component and subfolder: ``transformer`` or ``transformer_2``.
        sigma_range: The noise levels it denoises, ``(low, high)``.
    """

    name: str
    component: str
    sigma_range: tuple[float, float]


def expert_file_name(name: str, expert: str) -> str:
    """``name`` (``x.safetensors``) with expert ``high`` / ``low``'s suffix, as musubi-tuner,
    ai-toolkit and ComfyUI workflows name the two files: ``x_high_noise.safetensors``."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}_{expert}_noise{dot}{ext}" if dot else f"{name}_{expert}_noise"


def boundary_ratio(model_dir: Path, where: str = "model.expert") -> float:
    """The ``boundary_ratio`` of a two-expert pipeline folder (its ``model_index.json``).

    Raises:
        FlowtuneError: the folder's pipeline has no ``transformer_2`` or no ``boundary_ratio``.
    """
    index = Path(model_dir) / "model_index.json"
    try:
        config = json.loads(index.read_text())
    except (OSError, ValueError):
        config = {}
    second = config.get(SECOND_TRANSFORMER)
    ratio = config.get("boundary_ratio")
    if not (isinstance(second, list) and second and second[0]) or ratio is None:
        raise FlowtuneError(
            f"{where} is only for two-expert checkpoints (a transformer_2 and a boundary_ratio in "
            f"model_index.json, e.g. Wan 2.2 A14B); {model_dir} has none, so remove model.expert"
        )
    return float(ratio)


def experts(choice: str, boundary: float) -> list[Expert]:
    """The experts that ``model.expert`` = ``choice`` trains, high first."""
    high = Expert("high", "transformer", (boundary, 1.0))
    low = Expert("low", SECOND_TRANSFORMER, (0.0, boundary))
    return {"high": [high], "low": [low], "both": [high, low]}[choice]


def expert_component(name: str | None) -> str:
    """The pipeline component an expert's LoRA belongs to: ``transformer_2`` for ``low``, else
    ``transformer`` (``high``, or None: a model's one transformer)."""
    return SECOND_TRANSFORMER if name == "low" else "transformer"


def lora_expert(lora_file: Path) -> str | None:
    """The expert (``high`` / ``low``) a flowtune LoRA file was trained on (its metadata), None
    for a file of a single-transformer run or another tool's."""
    from flowtune.train.model import read_lora_metadata

    try:
        return read_lora_metadata(Path(lora_file)).get(META_EXPERT) or None
    except Exception:  # noqa: BLE001 - an unreadable file is reported by whoever loads it
        return None


def expert_loras(lora_file: Path) -> list[Path]:
    """The LoRA files that go with ``lora_file``: itself, and when it is the high-noise expert's
    file of a ``both`` run, the low-noise expert's beside it (``..._low_noise.safetensors``)."""
    lora_file = Path(lora_file)
    companion = lora_file.with_name(expert_file_name(lora_file.name, "low"))
    if lora_expert(lora_file) == "high" and companion.is_file() and lora_expert(companion) == "low":
        return [lora_file, companion]
    return [lora_file]


def expert_for_step(seed: int, step: int, high_probability: float) -> str:
    """Which expert a ``both`` run trains at optimizer ``step``: ``high`` with probability
    ``high_probability`` (the sampling distribution's mass above the boundary, so that the two
    LoRAs together see the recipe's sigma distribution), from a draw seeded by ``(seed, step)``
    alone: every process agrees, and a resumed run chooses as the uninterrupted one did."""
    import numpy as np

    draw = np.random.default_rng(np.random.SeedSequence([seed, step, 0x3E7])).random()
    return "high" if draw < high_probability else "low"
