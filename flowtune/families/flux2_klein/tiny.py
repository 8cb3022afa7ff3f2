"""FLUX.2 [klein]'s tiny random pipeline (``flowtune make-tiny flux2-klein``): FLUX.2's transformer
(without guidance embedding, as wide as a latent token) and VAE from
:mod:`flowtune.families.flux2.tiny`, with a tiny Qwen3 text encoder and a Qwen2-style byte-level
BPE tokenizer built here, offline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flowtune.families.flux2.tiny import (
    MISTRAL_HIDDEN,
    flux2_scheduler,
    tiny_flux2_transformer,
    tiny_flux2_vae,
)
from flowtune.tiny import CAPTION_WORDS, seeded_components

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

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
QWEN_MAX_LENGTH = 512  # the tokenizer's model_max_length (Flux2KleinPipeline's tokenizer_max_length)
# Qwen3's conversation format, as far as Flux2KleinPipeline uses it: each message in
# <|im_start|>ROLE\n...<|im_end|>\n, then (add_generation_prompt) the assistant's turn opened,
# with an empty thinking block when enable_thinking is false (the pipeline always passes false).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
# Words of the chat markup and of edit instructions, besides the caption words of CAPTION_WORDS
# and flowtune.data.synthetic's shape, colour and size names.
_EXTRA_WORDS = (
    "user assistant system think background make turn change into remove add replace color colour".split()
)


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2-style byte-level BPE tokenizer (Qwen3's class and pre-tokenizer) over a small
    vocabulary: the 256 byte symbols and merges that make each caption and markup word one token
    (with and without its leading space), learned here from those words; ``<|endoftext|>`` pads,
    ``<|im_start|>`` / ``<|im_end|>`` are special, ``<think>`` / ``</think>`` added, as in Qwen3."""
    import json

    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from flowtune.data.synthetic import COLOURS, SHAPES, SIZES

    words = list(dict.fromkeys([*CAPTION_WORDS, *SHAPES, *COLOURS, *SIZES, *_EXTRA_WORDS]))
    backend = Tokenizer(BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(  # Qwen2Tokenizer's, so that merges match it
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1 << 16,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*words, *(f" {word}" for word in words), "\n\n"], trainer)
    model = json.loads(backend.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(merge) for merge in model["merges"]],
        eos_token="<|im_end|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=QWEN_MAX_LENGTH,
    )
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _qwen3_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen3ForCausalLM:
    """A Qwen3 causal LM (the class Flux2KleinPipeline loads): 28 layers of width 16, two query
    heads and one key-value head of 8, special-token ids matching ``tokenizer``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=QWEN_HIDDEN,
        intermediate_size=2 * QWEN_HIDDEN,
        num_hidden_layers=QWEN_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=QWEN_HIDDEN // 2,
        max_position_embeddings=2048,
        initializer_range=QWEN_INIT_STD,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen3ForCausalLM(config).eval()


def build_tiny_flux2_klein(out_dir: Path, seed: int = 0, is_distilled: bool = False) -> None:
    """Write a tiny random FLUX.2 [klein]-shaped pipeline (``Flux2KleinPipeline``) to ``out_dir``.

    As :func:`flowtune.families.flux2.tiny.build_tiny_flux2`: loads with
    ``Flux2KleinPipeline.from_pretrained``, weights depend only on ``seed``, the caller's RNG is
    untouched.  By default it is a *base* model (``is_distilled`` false, like FLUX.2-klein-base-4B),
    so that the pipeline's classifier-free guidance runs and is tested; ``is_distilled=True``
    gives the step-distilled kind (FLUX.2-klein-4B / 9B), whose pipeline ignores the guidance.
    """
    from diffusers import Flux2KleinPipeline

    tokenizer = _qwen_tokenizer()
    components = seeded_components(
        seed,
        {
            "text_encoder": lambda: _qwen3_text_encoder(tokenizer),
            "vae": tiny_flux2_vae,
            "transformer": lambda: tiny_flux2_transformer(guidance_embeds=False, hidden=TRANSFORMER_HIDDEN),
        },
    )
    pipe = Flux2KleinPipeline(
        scheduler=flux2_scheduler(), tokenizer=tokenizer, is_distilled=is_distilled, **components
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
