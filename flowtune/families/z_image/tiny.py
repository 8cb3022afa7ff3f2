"""Z-Image's tiny random pipeline (``flowtune make-tiny z-image``): Z-Image's components and
geometry at minimal widths and depths (see :mod:`flowtune.tiny`).

Kept from the real model: the FLUX.1-style 16-channel VAE downsampling by 8 (the tiny one of
:mod:`flowtune.families.flux.tiny`, with its calibrated scaling and shift factors), the
transformer's 2x2 patchify (64 features a token) and three-axis RoPE, a Qwen3 text encoder whose
second-to-last hidden state is the caption embedding, and a byte-level BPE Qwen2 tokenizer with
Qwen3's chat template (``ZImagePipeline`` wraps every prompt in a user turn).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flowtune.data.synthetic import COLOURS, SHAPES, SIZES
from flowtune.families.flux.tiny import tiny_flux_vae
from flowtune.tiny import CAPTION_WORDS, seeded_components

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Model

QWEN_HIDDEN = 32  # the transformer's cap_feat_dim
QWEN_LAYERS = 3  # ZImagePipeline reads hidden_states[-2]: the output of layer 2 of 3
QWEN_MAX_LENGTH = 512  # ZImagePipeline's default max_sequence_length
# Weight std of the tiny Qwen3.  As for FLUX.2's tiny Mistral (flowtune.families.flux2.tiny): at
# width 32, transformers' default 0.02 leaves each hidden state close to its own token's
# embedding; a wider init makes the random model carry the caption into every later token.
QWEN_INIT_STD = 0.5
LATENT_CHANNELS = 16  # the FLUX.1 VAE's; 16 x 2 x 2 = 64 features a transformer token
TRANSFORMER_DIM = 64  # at least a latent token's features, so that the tiny model can fit them

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat format, as far as ZImagePipeline uses it: each message in
# <|im_start|>ROLE\n...<|im_end|>\n; the generation prompt opens the assistant turn, and with
# enable_thinking=False (not what ZImagePipeline passes) an empty thinking block follows it.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Words the tokenizer keeps whole besides CAPTION_WORDS: the chat roles, and the words of the
# synthetic datasets' captions (flowtune.data.synthetic).
_WORDS = ("user", "assistant", "system", "background", *SHAPES, *COLOURS, *SIZES)


def _byte_level_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merges, learned from ``words`` (ASCII), each with and
    without a leading space (GPT-2's "\u0120"), until every one of them is a single token: as BPE
    encodes a training word by replaying its merges, the words tokenize whole, and any other text
    falls back to smaller pieces and bytes.  Ties go to the smallest pair, so the result depends
    only on ``words``.

    Returns:
        ``(vocab, merges)``: the 256 byte symbols first, then the merged pieces in merge order.
    """
    from collections import Counter

    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    corpus = [list(form) for word in dict.fromkeys(words) for form in (word, "\u0120" + word)]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for symbols in corpus for pair in zip(symbols, symbols[1:], strict=False))
        if not counts:
            return vocab, merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        for symbols in corpus:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == pair:
                    symbols[i : i + 2] = [pair[0] + pair[1]]
                i += 1


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE tokenizer (as Qwen3's) in which the caption words are one token each,
    with Qwen3's special tokens (``<|endoftext|>`` pads) and chat template."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level_bpe([*CAPTION_WORDS, *_WORDS])
    endoftext, *control = QWEN_SPECIAL_TOKENS
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token=endoftext,
        extra_special_tokens=[endoftext, *control],
        chat_template=QWEN3_CHAT_TEMPLATE,
        model_max_length=QWEN_MAX_LENGTH,
    )


def _qwen3_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen3Model:
    """A 3-layer Qwen3 (the base model, no LM head, as Z-Image ships it) of width 32."""
    from transformers import Qwen3Config, Qwen3Model

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
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen3Model(config).eval()


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

    tokenizer = qwen_tokenizer()
    components = seeded_components(
        seed,
        {
            "text_encoder": lambda: _qwen3_text_encoder(tokenizer),
            "vae": tiny_flux_vae,
            "transformer": tiny_z_image_transformer,
        },
    )
    pipe = ZImagePipeline(scheduler=_z_image_scheduler(), tokenizer=tokenizer, **components)
    pipe.save_pretrained(out_dir, safe_serialization=True)
