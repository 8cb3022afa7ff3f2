"""Z-Image's tiny random pipeline (``flowtune make-tiny z-image``): Z-Image's components and
geometry at minimal widths and depths (see :mod:`flowtune.tiny`).

Kept from the real model: the FLUX.1-style 16-channel VAE downsampling by 8 (the tiny one of
:mod:`flowtune.families.flux.tiny`, with its calibrated scaling and shift factors), the
transformer's 2x2 patchify (64 features a token) and three-axis RoPE, a Qwen3 text encoder whose
second-to-last hidden state is the caption embedding, and a byte-level BPE Qwen2 tokenizer with
Qwen3's chat template (``ZImagePipeline`` wraps every prompt in a user turn), both from
:mod:`flowtune.tiny`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flowtune.families.flux.tiny import tiny_flux_vae
from flowtune.tiny import qwen3_tokenizer, seeded_components, tiny_qwen3

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

QWEN_HIDDEN = 32  # the transformer's cap_feat_dim
QWEN_LAYERS = 3  # ZImagePipeline reads hidden_states[-2]: the output of layer 2 of 3
# Weight std of the tiny Qwen3.  As for FLUX.2's tiny Mistral (flowtune.families.flux2.tiny): at
# width 32, transformers' default 0.02 leaves each hidden state close to its own token's
# embedding; a wider init makes the random model carry the caption into every later token.
QWEN_INIT_STD = 0.5
LATENT_CHANNELS = 16  # the FLUX.1 VAE's; 16 x 2 x 2 = 64 features a transformer token
TRANSFORMER_DIM = 64  # at least a latent token's features, so that the tiny model can fit them


def tiny_z_image_transformer(dim: int = TRANSFORMER_DIM) -> ZImageTransformer2DModel:
    """A Z-Image-shaped transformer: 1 noise- and 1 context-refiner block, 2 main blocks, width
    ``dim`` (a multiple of 16) in two heads, RoPE axes (dim/8, 3 dim/16, 3 dim/16).

    Takes latents [16, 1, H, W] (patchified 2x2 itself) and Qwen3 embeddings [L, 32]; random
    weights from torch's global RNG.
    """
    from diffusers import ZImageTransformer2DModel

    head = dim // 2
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=LATENT_CHANNELS,
        dim=dim,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=QWEN_HIDDEN,
        axes_dims=[head // 4, 3 * head // 8, 3 * head // 8],
        axes_lens=[1024, 512, 512],
    ).eval()


def _z_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Z-Image-Turbo's scheduler config: a static shift of 3 (ZImagePipeline passes its own
    sigmas and a resolution-dependent mu, which only a dynamically shifting config uses)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def build_tiny_z_image(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random Z-Image-shaped pipeline (``ZImagePipeline``) to ``out_dir``.

    Like FLUX.1's :func:`flowtune.families.flux.tiny.build_tiny_flux`: loads with
    ``ZImagePipeline.from_pretrained``, weights depend only on ``seed``, the caller's RNG is
    untouched.
    """
    from diffusers import ZImagePipeline

    tokenizer = qwen3_tokenizer()
    components = seeded_components(
        seed,
        {
            # The base model, no LM head, as Z-Image ships it.
            "text_encoder": lambda: tiny_qwen3(
                tokenizer, hidden=QWEN_HIDDEN, layers=QWEN_LAYERS, init_std=QWEN_INIT_STD, causal_lm=False
            ),
            "vae": tiny_flux_vae,
            "transformer": tiny_z_image_transformer,
        },
    )
    pipe = ZImagePipeline(scheduler=_z_image_scheduler(), tokenizer=tokenizer, **components)
    pipe.save_pretrained(out_dir, safe_serialization=True)
