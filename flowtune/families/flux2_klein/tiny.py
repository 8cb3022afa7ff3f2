"""FLUX.2 [klein]'s tiny random pipeline (``flowtune make-tiny flux2-klein``): FLUX.2's transformer
(without guidance embedding, as wide as a latent token) and VAE from
:mod:`flowtune.families.flux2.tiny`, with a tiny Qwen3 causal LM and Qwen2-style byte-level BPE
tokenizer from :mod:`flowtune.tiny`, built offline."""

from __future__ import annotations

from pathlib import Path

from flowtune.families.flux2.tiny import (
    EDIT_WORDS,
    MISTRAL_HIDDEN,
    flux2_scheduler,
    tiny_flux2_transformer,
    tiny_flux2_vae,
)
from flowtune.tiny import qwen3_tokenizer, seeded_components, tiny_qwen3

# The tiny Qwen3's width: three of its hidden states are concatenated per token into the
# transformer's text input, which the tiny FLUX.2 transformer takes 3 x 16 = 48 wide.
QWEN_HIDDEN = MISTRAL_HIDDEN
# Flux2KleinPipeline reads hidden states (9, 18, 27) of Qwen3's 36 layers; 28 layers keep all three
# intermediate (hidden state 28 would be the final, normed one).
QWEN_LAYERS = 28
# As the tiny Mistral's (flowtune.families.flux2.tiny.MISTRAL_INIT_STD, where it was measured): at
# width 16 transformers' default 0.02 hardly mixes tokens, so only the caption's own few tokens of
# the padded window would carry it; 0.5 makes the later tokens carry it too, as in a trained LM.
QWEN_INIT_STD = 0.5
# The tiny transformer's width: a latent token's 128 features (32 latent channels x 2 x 2), the
# least with which its output projection spans a token, so that a LoRA on it can fit the velocity.
TRANSFORMER_HIDDEN = 128


def build_tiny_flux2_klein(out_dir: Path, seed: int = 0, is_distilled: bool = False) -> None:
    """Write a tiny random FLUX.2 [klein]-shaped pipeline (``Flux2KleinPipeline``) to ``out_dir``.

    As :func:`flowtune.families.flux2.tiny.build_tiny_flux2`: loads with
    ``Flux2KleinPipeline.from_pretrained``, weights depend only on ``seed``, the caller's RNG is
    untouched.  By default it is a *base* model (``is_distilled`` false, like FLUX.2-klein-base-4B),
    so that the pipeline's classifier-free guidance runs and is tested; ``is_distilled=True``
    gives the step-distilled kind (FLUX.2-klein-4B / 9B), whose pipeline ignores the guidance.
    """
    from diffusers import Flux2KleinPipeline

    # Qwen3-4B's kind: a causal LM (the class the pipeline loads) with its head tied.
    tokenizer = qwen3_tokenizer(EDIT_WORDS)
    components = seeded_components(
        seed,
        {
            "text_encoder": lambda: tiny_qwen3(
                tokenizer,
                hidden=QWEN_HIDDEN,
                layers=QWEN_LAYERS,
                init_std=QWEN_INIT_STD,
                causal_lm=True,
                tie_word_embeddings=True,
            ),
            "vae": tiny_flux2_vae,
            "transformer": lambda: tiny_flux2_transformer(guidance_embeds=False, hidden=TRANSFORMER_HIDDEN),
        },
    )
    pipe = Flux2KleinPipeline(
        scheduler=flux2_scheduler(), tokenizer=tokenizer, is_distilled=is_distilled, **components
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
