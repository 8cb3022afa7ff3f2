"""Tiny random pipelines, built offline, for tests and the demo: the shared part.

A tiny pipeline has the real layout and geometry of its model family (the same components, latent
channels, VAE downsampling, latent packing, scheduler config) but minimal widths and depths and
random weights, so everything that shared code does with a real checkpoint (load it, encode
prompts, pack latents, train a LoRA, sample) runs on a CPU in seconds.  Nothing is downloaded:
even the tokenizers are constructed here from small fixed vocabularies.

:func:`make_tiny` is what the ``flowtune make-tiny`` command calls; the per-family builders
(``FamilySpec.tiny_builder``, in each family's package ``flowtune/families/<name>/tiny.py``) write
the diffusers-format directory, with the helpers here (per-component seeds, a Unigram tokenizer
over a small caption vocabulary, a tiny Qwen3 text encoder with its Qwen2-style BPE tokenizer).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.fileio import atomic_dir, write_errors

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import Qwen2Tokenizer, Qwen3ForCausalLM, Qwen3Model

# T5 sentencepiece-style pieces: "\u2581" marks the start of a word.  Whole common words score
# higher than spelling a word out character by character, as in a trained Unigram model.
_WORD_START = "\u2581"
CAPTION_WORDS = (
    "a an the of and in on with at to for from by is are this that it its "
    "photo picture painting drawing image portrait style art render "
    "red green blue yellow black white orange purple pink brown gray grey "
    "square circle triangle cat dog bird horse person man woman child face tree flower house car "
    "sky sun moon sea water mountain city street forest field light dark big small tiny "
    "beautiful detailed high quality"
).split()
_SUFFIXES = ("s", "es", "ed", "ing", "er", "ly")
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()[]-_/&+*%$#@=<>~"


def component_seed(seed: int, component: str) -> int:
    """A seed for one component, so that each component depends only on ``seed`` and its name."""
    return zlib.crc32(f"{seed}:{component}".encode())


# The tiny VAEs' layout: 4 levels (downsampling by 8, as every image family's VAE) of 8 channels
# with one layer each; the families add their latent channels and normalisation.
TINY_VAE_LAYOUT: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 8, 8),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}


def seeded_components(seed: int, builders: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Build each component with torch's global RNG seeded by :func:`component_seed` of ``seed``
    and its name, so that each depends only on ``seed`` and its name; the caller's RNG state is
    left untouched.

    Args:
        builders: ``{component name: function building it}``, called in order.
    """
    import torch

    built = {}
    with torch.random.fork_rng(devices=[]):
        for name, build in builders.items():
            torch.manual_seed(component_seed(seed, name))
            built[name] = build()
    return built


def unigram_tokenizer(words: list[str]) -> Tokenizer:
    """A Unigram tokenizer backend over ``words`` (whole pieces) with a character fallback.

    Sentencepiece-style: "\u2581" marks the start of a word; whole known words score higher than
    spelling a word out character by character, as in a trained model, so any text tokenizes and
    different texts give different tokens.  Ids 0/1/2 are pad/eos/unk, as in T5.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import Unigram

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (_WORD_START, -4.0)]
    pieces += [(_WORD_START + word, -3.0) for word in dict.fromkeys(words)]
    pieces += [(suffix, -3.5) for suffix in _SUFFIXES]
    pieces += [(_WORD_START + char, -5.0) for char in _CHARS]
    pieces += [(char, -6.0) for char in _CHARS]

    backend = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    # The same pre-tokenizer and decoder as transformers' T5 tokenizer, so the tokenizer behaves
    # the same before saving and after loading (loading rebuilds them from the class).
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=_WORD_START, prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement=_WORD_START, prepend_scheme="always", split=True)
    return backend


# Qwen3's conversation format, as far as the diffusion pipelines use it: each message in
# <|im_start|>ROLE\n...<|im_end|>\n, then (add_generation_prompt) the assistant's turn opened,
# with an empty thinking block when enable_thinking is false.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
# Qwen3's prompt length in the pipelines that use it (their tokenizer_max_length or default
# max_sequence_length), the tiny tokenizer's model_max_length.
QWEN3_MAX_LENGTH = 512
# Words every tiny Qwen3 tokenizer keeps whole besides CAPTION_WORDS and flowtune.data.synthetic's
# shape, colour and size names: the chat roles, and the rest of the synthetic captions' words.
_QWEN3_WORDS = ("system", "user", "assistant", "background")


def qwen3_tokenizer(words: Iterable[str] = (), max_length: int = QWEN3_MAX_LENGTH) -> Qwen2Tokenizer:
    """A Qwen2-style byte-level BPE tokenizer (Qwen3's class and pre-tokenizer) over a small
    vocabulary: the 256 byte symbols and the merges, learned here by tokenizers' BPE trainer, that
    make each caption word (:data:`CAPTION_WORDS` and the synthetic datasets'), chat role and
    word of ``words`` one token, with and without its leading space, and ``"\\n\\n"`` one token;
    any other text falls back to smaller pieces and bytes.  As Qwen3's: ``<|endoftext|>`` pads,
    ``<|im_end|>`` ends, ``<|im_start|>`` / ``<|im_end|>`` are special, ``<think>`` /
    ``</think>`` added, no unknown token; with :data:`QWEN3_CHAT_TEMPLATE`.  The result depends
    only on ``words``.
    """
    import json

    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from flowtune.data.synthetic import COLOURS, SHAPES, SIZES

    kept = list(dict.fromkeys([*CAPTION_WORDS, *SHAPES, *COLOURS, *SIZES, *_QWEN3_WORDS, *words]))
    backend = Tokenizer(BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(  # Qwen2Tokenizer's, so that merges match it
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(  # merges until every word is one token; deterministic
        vocab_size=1 << 16,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*kept, *(f" {word}" for word in kept), "\n\n"], trainer)
    model = json.loads(backend.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(merge) for merge in model["merges"]],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=QWEN3_CHAT_TEMPLATE,
        model_max_length=max_length,
    )
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def tiny_qwen3(
    tokenizer: Qwen2Tokenizer,
    *,
    hidden: int,
    layers: int,
    init_std: float,
    causal_lm: bool,
    tie_word_embeddings: bool = False,
) -> Qwen3ForCausalLM | Qwen3Model:
    """A tiny random Qwen3 text encoder over ``tokenizer``'s vocabulary (its special-token ids):
    ``layers`` layers of width ``hidden`` (even), two query heads and one key-value head of
    ``hidden / 2``, an MLP twice as wide; weights from torch's global RNG with std ``init_std``.

    Args:
        causal_lm: A ``Qwen3ForCausalLM`` (with its LM head, tied to the input embedding with
            ``tie_word_embeddings``); else the base ``Qwen3Model``.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=2048,
        initializer_range=init_std,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()


def make_tiny(
    family: str, out_dir: str | Path, seed: int = 0, overwrite: bool = False, variant: str | None = None
) -> Path:
    """Build a tiny random pipeline of ``family`` into ``out_dir`` and return its resolved path.

    The pipeline is written to a temporary sibling directory and renamed into place, so an
    interrupted build never leaves a half-written model directory at ``out_dir`` (at most a
    hidden ``.<name>.tmp-*`` sibling).

    Args:
        family: A registered family name (see :mod:`flowtune.families`).
        out_dir: The directory to create.  It may exist if it is empty.
        seed: Seed for the random weights.
        overwrite: Replace ``out_dir`` if it exists and is not empty.
        variant: One of the family's ``FamilySpec.tiny_variants`` (e.g. Wan's ``i2v``); None:
            its main tiny pipeline.

    Raises:
        FlowtuneError: Unknown family or variant, ``out_dir`` is a file or a non-empty directory (without
            ``overwrite``), or its parent directory cannot be written.
    """
    spec = get_family(family)
    try:
        builder = spec.load_tiny_builder(variant)
    except ValueError as err:
        raise FlowtuneError(f"{err}; leave out --variant for its main tiny pipeline") from None
    target = Path(out_dir).expanduser().resolve()
    if target.exists():
        if not target.is_dir():
            raise FlowtuneError(f"{target} exists and is not a directory; choose another output directory")
        if any(target.iterdir()) and not overwrite:
            raise FlowtuneError(
                f"output directory {target} is not empty; pass --overwrite to replace it "
                "or choose another directory"
            )

    hint = "choose another directory"
    try:
        with write_errors(target, hint=hint):
            target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # not a file-system refusal: e.g. a file where a folder should be
        raise FlowtuneError(f"cannot create {target}: {err.strerror or err}; {hint}") from None
    # Written to a temporary folder and renamed into place (an existing one is moved aside first),
    # so that at every moment either the old or the new complete directory exists.
    with atomic_dir(target, hint=hint) as staging:
        builder(staging, seed)
    return target


def t5_encoder_config(config_class: type, tokenizer: Any, d_model: int) -> Any:
    """A 2-layer T5 v1.1-style encoder config (gated GELU, relative attention, no dropout) of
    width ``d_model`` sized to ``tokenizer``: ``config_class`` is ``T5Config`` (FLUX.1's T5-XXL)
    or ``UMT5Config`` (Wan's umt5-xxl, which has a relative attention bias per layer)."""
    return config_class(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
