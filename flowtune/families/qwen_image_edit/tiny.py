"""Qwen-Image-Edit's tiny random pipeline: Qwen-Image's tiny components (:mod:`flowtune.families.
qwen_image.tiny`), a transformer with Qwen-Image-Edit-2511's ``zero_cond_t`` (the reference tokens
get the timestep 0), and the ``processor`` (Qwen2VLProcessor) that the edit pipeline runs its
vision-language prompt through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flowtune.families.qwen_image.tiny import _open_gates, tiny_qwen_components, tiny_qwen_transformer
from flowtune.families.qwen_image_edit.encoder import image_only_processor, save_processor
from flowtune.tiny import component_seed

if TYPE_CHECKING:
    from diffusers import QwenImageTransformer2DModel


def tiny_qwen_edit_transformer(hidden: int = 64) -> QwenImageTransformer2DModel:
    """:func:`tiny_qwen_transformer` with ``zero_cond_t`` (Qwen-Image-Edit-2511's config): random
    weights from torch's global RNG, residual gates opened."""
    from diffusers import QwenImageTransformer2DModel

    config = {k: v for k, v in tiny_qwen_transformer(hidden).config.items() if not k.startswith("_")}
    transformer = QwenImageTransformer2DModel(**{**config, "zero_cond_t": True}).eval()
    _open_gates(transformer)
    return transformer


def tiny_qwen_edit_components(seed: int) -> dict:
    """The tiny edit pipeline's components but its ``processor``: Qwen-Image's, with
    :func:`tiny_qwen_edit_transformer`."""
    components = tiny_qwen_components(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(seed, "transformer"))
        components["transformer"] = tiny_qwen_edit_transformer()
    return components


def tiny_qwen_edit_processor(tokenizer: Any) -> Any:
    """The tiny pipeline's ``processor``: Qwen2-VL's PIL image processor (its default settings,
    Qwen-Image-Edit's) and the tiny tokenizer, without a video processor (no torchvision)."""
    from transformers import Qwen2VLImageProcessorPil

    return image_only_processor(Qwen2VLImageProcessorPil(), tokenizer)


def build_tiny_qwen_image_edit(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random ``QwenImageEditPlusPipeline`` to ``out_dir``.

    Its ``processor`` folder holds the tokenizer and image processor files, as the Hub's does, and
    model_index.json names it a ``Qwen2VLProcessor``; ``Qwen2VLProcessor.save_pretrained`` cannot
    write a processor without a video processor, so the pipeline is saved without it and the
    folder is written by :func:`save_processor`.  flowtune loads it back with
    :func:`load_processor` (``QwenImageEditEncoder.pipeline_components``).
    """
    from diffusers import QwenImageEditPlusPipeline

    out_dir = Path(out_dir)
    components = tiny_qwen_edit_components(seed)
    processor = tiny_qwen_edit_processor(components["tokenizer"])
    QwenImageEditPlusPipeline(**components, processor=None).save_pretrained(out_dir, safe_serialization=True)
    save_processor(processor, out_dir / "processor")
    index_file = out_dir / "model_index.json"
    index = json.loads(index_file.read_text(encoding="utf-8"))
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
