"""FLUX.1 Kontext encoding: FLUX.1's, plus reference images resized as FluxKontextPipeline does.

Captions (instructions) and target images are encoded exactly as for FLUX.1
(:class:`FluxEncoder`).  A reference (control) image is first resized the way
``FluxKontextPipeline`` resizes its ``image`` argument (to the preferred Kontext resolution
nearest to its aspect ratio, sides multiples of 16, with the pipeline's own image processor),
then encoded like any image, so its cached latents are the ``image_latents`` the pipeline computes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowtune.families.flux.encoder import FluxEncoder

if TYPE_CHECKING:
    from PIL import Image


class FluxKontextEncoder(FluxEncoder):
    """FLUX.1 Kontext [dev] encoder: :class:`FluxEncoder` plus reference-image preparation."""

    def control_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) FluxKontextPipeline resizes a ``width`` x ``height`` reference to:
        the preferred Kontext resolution nearest in aspect ratio, sides floored to multiples of 16."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        # The pipeline's image processor works in multiples of the VAE factor x the 2x2 packing
        # (16 for FLUX.1): it floors the sides to those before taking the aspect ratio.
        g = self.spec.spatial_granularity
        width -= width % g
        height -= height % g
        aspect = width / height
        _, w, h = min((abs(aspect - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
        return w // g * g, h // g * g

    def prepare_control(self, image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
        """``image`` resized to ``size`` = (width, height) with the pipeline's image processor, as
        FluxKontextPipeline resizes its reference (needs :meth:`load` with ``images=True``); both
        ``data.control_resize`` modes (``mode``) resize, only to different sizes."""
        width, height = size
        return self.pipe.image_processor.resize(image, height, width)

    @classmethod
    def reference_inputs(
        cls, pipe: Any, images: list[Image.Image], height: int, width: int, control_resize: str = "pipeline"
    ) -> dict[str, Any]:
        """FluxKontextPipeline's arguments (besides the prompt, size and sampler settings) for
        the reference image, resized as training resized it.

        Args:
            pipe: The loaded FluxKontextPipeline.
            images: The reference image (one).
            height, width: The size generated; passed as ``max_area`` too, without which the
                pipeline rescales the output to about 1024 x 1024.
            control_resize: ``data.control_resize``: ``pipeline`` (or its former name
                ``kontext``) lets the pipeline resize the reference to its preferred resolution; ``match_target`` resizes it to
                (width, height) with the pipeline's image processor and keeps that size.

        Raises:
            ValueError: not exactly one reference (diffusers' FluxKontextPipeline takes one).
        """
        if len(images) != 1:
            raise ValueError(f"FluxKontextPipeline takes one reference image, got {len(images)}")
        image = images[0]
        if control_resize == "match_target":
            image = pipe.image_processor.resize(image, height, width)
        return {"image": image, "max_area": height * width, "_auto_resize": control_resize != "match_target"}
