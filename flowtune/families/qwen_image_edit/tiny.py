"""Qwen-Image-Edit's tiny random pipeline: Qwen-Image's tiny components (:mod:`flowtune.families.
qwen_image.tiny`), a transformer with Qwen-Image-Edit-2511's ``zero_cond_t`` (the reference tokens
get the timestep 0), and the ``processor`` (Qwen2VLProcessor) that the edit pipeline runs its
vision-language prompt through."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flowtune.errors import FlowtuneError
from flowtune.families.qwen_image.tiny import _open_gates, tiny_qwen_components, tiny_qwen_transformer
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


def build_tiny_qwen_image_edit(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random ``QwenImageEditPlusPipeline`` to ``out_dir``.

    Raises:
        FlowtuneError: transformers cannot build a Qwen2VLProcessor here: its video processor
            needs torchvision, which flowtune's environment leaves out (transformers 5.24).
    """
    from diffusers import QwenImageEditPlusPipeline

    components = tiny_qwen_edit_components(seed)
    try:
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        processor = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(),
            tokenizer=components["tokenizer"],
            video_processor=Qwen2VLVideoProcessor(),
        )
    except (ImportError, AttributeError, TypeError) as err:
        raise FlowtuneError(
            f"cannot build Qwen-Image-Edit's processor (Qwen2VLProcessor) here: {err}; it needs torchvision"
        ) from None
    QwenImageEditPlusPipeline(**components, processor=processor).save_pretrained(
        out_dir, safe_serialization=True
    )
