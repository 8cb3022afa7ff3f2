"""FLUX.2 [klein] adapter: FLUX.2's, without guidance (klein's transformers have no guidance
embedding; Flux2KleinPipeline passes ``guidance=None``)."""

from __future__ import annotations

from typing import Any

from flowtune.families.flux2.adapter import Flux2Adapter
from flowtune.flow_matching.adapters.base import ExampleSize


class Flux2KleinAdapter(Flux2Adapter):
    """Model adapter for FLUX.2 [klein] (4B, 9B, and their base models) in diffusers' layout.

    The same batch keys and transformer call as :class:`Flux2Adapter` (patchified, BN-normalized
    latents [B, 128, H_p, W_p] packed to tokens; 4-axis ids; ``timestep`` = sigma, which the
    transformer scales by 1000 as Flux2KleinPipeline passes ``t / 1000``; reference tokens after
    the target's), except that:

    - ``text_embeddings`` are [B, L, 3 x Qwen3 hidden]: 12288 for klein 9B, 7680 for klein 4B;
    - ``guidance`` is always None.  The step-distilled klein models are not guidance-distilled:
      their guidance is classifier-free, done by the pipeline (two transformer calls), never an
      input of the transformer.

    Takes no arguments.  A transformer with guidance embeddings (FLUX.2 [dev]) is refused when
    called, since klein never passes guidance.
    """

    def __init__(self) -> None:
        super().__init__(guidance_scale=1.0, use_guidance_embeds=False)

    def example_shapes(self, config: dict[str, Any], size: ExampleSize) -> dict[str, tuple[int, ...]]:
        """As :meth:`Flux2Adapter.example_shapes`, with the text width of klein 9B (3 x 4096)
        when the config names none."""
        return super().example_shapes({"joint_attention_dim": 12288, **config}, size)
