"""Family encoders: images and captions -> the tensors that preprocess caches and training reads.

Each model family has one encoder class (named by ``FamilySpec.encoder``) that drives the family's
own diffusers pipeline, loaded without its transformer.
"""

from flowtune.encoders.base import EncoderSettings, FamilyEncoder, create_encoder

__all__ = ["EncoderSettings", "FamilyEncoder", "create_encoder"]
