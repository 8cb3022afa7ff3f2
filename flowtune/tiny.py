"""Tiny random pipelines, built offline, for tests and the demo.

A tiny pipeline has the real layout and geometry of its model family (the same components, latent
channels, VAE downsampling, latent packing, scheduler config) but minimal widths and depths and
random weights, so everything that shared code does with a real checkpoint (load it, encode
prompts, pack latents, train a LoRA, sample) runs on a CPU in seconds.  Nothing is downloaded:
even the tokenizers are constructed here from small fixed vocabularies.

:func:`make_tiny` is what the ``flowtune make-tiny`` command calls; the per-family builders
(``FamilySpec.tiny_builder``) write the diffusers-format directory.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.fileio import atomic_dir, write_errors

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Transformer2DModel,
        FluxTransformer2DModel,
    )
    from tokenizers import Tokenizer
    from transformers import (
        CLIPTextModel,
        CLIPTokenizer,
        Mistral3ForConditionalGeneration,
        PreTrainedTokenizerFast,
        T5EncoderModel,
        T5TokenizerFast,
    )

# Sizes of the tiny FLUX.1 components.  Everything else (latent channels, 2x2 packing, VAE
# downsampling by 8, RoPE over three axes, guidance embedding) is FLUX.1 [dev]'s own geometry.
CLIP_HIDDEN = 32  # pooled_projection_dim of the transformer
T5_D_MODEL = 32  # joint_attention_dim of the transformer
CLIP_MAX_LENGTH = 77  # CLIP's context length, as in FLUX.1
T5_MAX_LENGTH = 512  # FLUX.1's T5 tokenizer limit (and FluxPipeline's default max_sequence_length)
LATENT_CHANNELS = 16  # FLUX.1's VAE latent channels; the transformer sees 16 x 2 x 2 = 64
# The VAE latent normalisation z -> (z - shift) * scale.  FLUX.1's values (0.3611, 0.1159) are
# what give *its* VAE's latents zero mean and unit variance; the tiny random VAE's raw latents of
# ordinary images have mean ~0.03 and std ~0.33 (measured over several seeds on the synthetic
# shapes), so these are calibrated the same way, and normalized tiny latents have unit variance
# like real ones.  With FLUX.1's numbers they would be ~8x smaller than the noise, and training
# on them would hardly see the images.
VAE_SCALING_FACTOR = 3.0
VAE_SHIFT_FACTOR = 0.03

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

# T5 sentencepiece-style pieces: "\u2581" marks the start of a word.  Whole common words score
# higher than spelling a word out character by character, as in a trained Unigram model.
_WORD_START = "\u2581"
_WORDS = (
    "a an the of and in on with at to for from by is are this that it its "
    "photo picture painting drawing image portrait style art render "
    "red green blue yellow black white orange purple pink brown gray grey "
    "square circle triangle cat dog bird horse person man woman child face tree flower house car "
    "sky sun moon sea water mountain city street forest field light dark big small tiny "
    "beautiful detailed high quality"
).split()
_SUFFIXES = ("s", "es", "ed", "ing", "er", "ly")
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()[]-_/&+*%$#@=<>~"


def _component_seed(seed: int, component: str) -> int:
    """A seed for one component, so that each component depends only on ``seed`` and its name."""
    return zlib.crc32(f"{seed}:{component}".encode())


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with no merges: every character is its own token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    # The 256 printable stand-ins of the byte-level pre-tokenizer, sorted for a stable order.
    symbols = sorted(ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols] + [CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def _clip_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer CLIP text encoder whose special-token ids match ``tokenizer``.

    The pooled output (FLUX's ``pooled_projections``) is read at the first EOS token, so the
    config's ``eos_token_id`` must be the tokenizer's.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=2 * CLIP_HIDDEN,
        projection_dim=CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _unigram_tokenizer(words: list[str]) -> Tokenizer:
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


def _t5_tokenizer() -> T5TokenizerFast:
    """A T5 Unigram tokenizer over a small fixed vocabulary (ids 0/1/2 = pad/eos/unk, as in T5)."""
    from tokenizers import processors
    from transformers import T5TokenizerFast

    backend = _unigram_tokenizer(list(_WORDS))
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    # extra_ids=0: no T5 sentinel tokens, so len(tokenizer) is the vocabulary above.
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _t5_encoder(tokenizer: T5TokenizerFast) -> T5EncoderModel:
    """A 2-layer T5 v1.1-style encoder (gated GELU, relative attention) sized to ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_D_MODEL,
        d_kv=8,
        d_ff=2 * T5_D_MODEL,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def _vae() -> AutoencoderKL:
    """FLUX.1's VAE layout (4 levels: downsampling by 8, 16 latent channels) at 8 channels wide."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=LATENT_CHANNELS,
        sample_size=64,
        scaling_factor=VAE_SCALING_FACTOR,
        shift_factor=VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def tiny_flux_transformer(guidance_embeds: bool = True, hidden: int = 32) -> FluxTransformer2DModel:
    """A FLUX.1 [dev]-shaped transformer: 2 double- and 2 single-stream blocks, hidden size 32
    unless ``hidden`` says otherwise.

    Takes latents of 16 channels packed 2x2 ([B, N, 64]), T5 embeddings [B, L, 32] and CLIP
    pooled embeddings [B, 32]; random weights from torch's global RNG.  ``guidance_embeds=False``
    gives a FLUX.1 [schnell]-style model.  ``hidden`` (a multiple of 16) widens it: two heads of
    ``hidden / 2``, RoPE axes (hidden/8, 3 hidden/16, 3 hidden/16), which sum to the head size.
    """
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        out_channels=None,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=hidden // 2,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(hidden // 8, 3 * hidden // 16, 3 * hidden // 16),
    ).eval()


def _flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1 [dev]'s scheduler config (resolution-dependent timestep shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_tiny_flux(out_dir: Path, seed: int = 0, pipeline_class: str = "FluxPipeline") -> None:
    """Write a tiny random FLUX.1 [dev]-shaped pipeline to ``out_dir`` in diffusers format.

    The directory loads with ``diffusers.<pipeline_class>.from_pretrained`` and generates images
    (noise-like ones).  Weights are safetensors and depend only on ``seed``: the same seed gives
    byte-identical weight files.  The caller's global torch RNG state is left untouched.

    Args:
        out_dir: Where to write; created if missing (use :func:`make_tiny` for an atomic write).
        seed: Seed for the random weights.
        pipeline_class: ``FluxPipeline``, or ``FluxKontextPipeline`` (same components).
    """
    import diffusers

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, "text_encoder"))
        text_encoder = _clip_text_encoder(tokenizer)
        torch.manual_seed(_component_seed(seed, "text_encoder_2"))
        text_encoder_2 = _t5_encoder(tokenizer_2)
        torch.manual_seed(_component_seed(seed, "vae"))
        vae = _vae()
        torch.manual_seed(_component_seed(seed, "transformer"))
        transformer = tiny_flux_transformer()

    pipe = getattr(diffusers, pipeline_class)(
        scheduler=_flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def build_tiny_flux_kontext(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random FLUX.1 Kontext [dev]-shaped pipeline (``FluxKontextPipeline``): the
    components of :func:`build_tiny_flux`, which Kontext shares with FLUX.1."""
    build_tiny_flux(out_dir, seed, pipeline_class="FluxKontextPipeline")


# -- FLUX.2 ----------------------------------------------------------------------------------------

# Sizes of the tiny FLUX.2 components.  FLUX.2 [dev]'s geometry is kept: a 32-channel VAE that
# downsamples by 8 with a batch norm over its 2x2-patchified latents (128 channels), 4-axis RoPE,
# guidance embedding, and a Mistral3 text encoder whose hidden states 10, 20 and 30 (what
# Flux2Pipeline stacks) are concatenated into the transformer's text input.
MISTRAL_HIDDEN = 16
MISTRAL_LAYERS = 30  # Flux2Pipeline reads hidden states (10, 20, 30)
# Weight std of the tiny Mistral.  transformers' default 0.02 suits Mistral Small's width (5120); at
# width 16 its layers hardly mix tokens, so each hidden state is close to its own token's
# embedding: the tokens after the caption differ between captions by only ~9% (at 0.5: ~45%), only
# the ~6 caption words of the 48-token window carry the caption, and a LoRA on the tiny FLUX.2
# learns to ignore the text (tests/test_flux2_learning.py).  Trained LMs carry the context in every
# later token; 0.5 makes the random one do so too.
MISTRAL_INIT_STD = 0.5
FLUX2_LATENT_CHANNELS = 32  # x 2 x 2 patch = 128 transformer input channels
MISTRAL_SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "<pad>",
)
# Mistral's conversation format: the system message in [SYSTEM_PROMPT]...[/SYSTEM_PROMPT], user
# turns in [INST]...[/INST], assistant turns closed by </s>; message contents are lists of text
# (and image) parts, as Flux2Pipeline's format_input builds them.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- set text = namespace(value='') %}"
    "{%- if message['content'] is string %}{%- set text.value = message['content'] %}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{%- set text.value = text.value + part['text'] %}"
    "{%- else %}{%- set text.value = text.value + '[IMG]' %}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text.value }}[/SYSTEM_PROMPT]"
    "{%- elif message['role'] == 'user' %}[INST]{{ text.value }}[/INST]"
    "{%- else %}{{ text.value }}{{ eos_token }}{%- endif %}"
    "{%- endfor %}"
)
# Words of edit instructions, besides the caption words of _WORDS.
_EDIT_WORDS = "make turn change into remove add replace color colour shape star ring cross large".split()


def _mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A Mistral-style tokenizer with a chat template, over a small fixed vocabulary.

    Its vocabulary holds the caption words and the words of Flux2Pipeline's system message, so
    that the system message costs about one token per word and short ``max_sequence_length``
    settings still leave room for the caption.
    """
    import re

    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PreTrainedTokenizerFast

    system_words = re.findall(r"[A-Za-z]+", SYSTEM_MESSAGE)
    backend = _unigram_tokenizer([*_WORDS, *_EDIT_WORDS, *system_words])
    unk, bos, eos, *control, pad = MISTRAL_SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=control,
        chat_template=MISTRAL_CHAT_TEMPLATE,
        model_max_length=T5_MAX_LENGTH,
    )


def _mistral3_text_encoder(tokenizer: PreTrainedTokenizerFast) -> Mistral3ForConditionalGeneration:
    """A Mistral3 (Mistral Small 3.x) vision-language model: 30 text layers of width 16 and a
    1-layer Pixtral vision tower, special-token ids matching ``tokenizer``."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=MISTRAL_HIDDEN,
        intermediate_size=2 * MISTRAL_HIDDEN,
        num_hidden_layers=MISTRAL_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=MISTRAL_HIDDEN // 2,
        max_position_embeddings=2048,
        initializer_range=MISTRAL_INIT_STD,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = PixtralVisionConfig(
        hidden_size=MISTRAL_HIDDEN,
        intermediate_size=2 * MISTRAL_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=MISTRAL_HIDDEN // 2,
        patch_size=16,
        image_size=64,
    )
    config = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
    )
    return Mistral3ForConditionalGeneration(config).eval()


def _flux2_vae() -> AutoencoderKLFlux2:
    """FLUX.2's VAE layout (4 levels: downsampling by 8, 32 latent channels, batch norm over the
    2x2-patchified latents) at 8 channels wide; the batch norm's running statistics are those of
    its own latents of synthetic shape images (:func:`_calibrate_flux2_batch_norm`)."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=FLUX2_LATENT_CHANNELS,
        sample_size=64,
    ).eval()
    _calibrate_flux2_batch_norm(vae)
    return vae


@torch.no_grad()
def _calibrate_flux2_batch_norm(vae: AutoencoderKLFlux2, count: int = 16, size: int = 64) -> None:
    """Set ``vae.bn``'s running mean and variance to the per-channel statistics of the VAE's
    patchified latents (``latent_dist.mode()``) of ``count`` synthetic shape images.

    FLUX.2's real statistics are what make *its* latents zero-mean and unit-variance; a random
    VAE's latents have other statistics, so they are measured the same way, and normalized tiny
    latents have unit variance like real ones (with the initial 0/1 the images would be several
    times smaller than the noise, and training would hardly see them).
    """
    import numpy as np
    from diffusers import Flux2Pipeline

    from flowtune.data.synthetic import draw_shape, sample_specs

    images = [
        np.asarray(draw_shape(spec, size, size), dtype=np.float32) for spec in sample_specs(count, seed=0)
    ]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    latents = Flux2Pipeline._patchify_latents(vae.encode(pixels).latent_dist.mode())
    vae.bn.running_mean.copy_(latents.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(latents.var(dim=(0, 2, 3)))


def tiny_flux2_transformer(guidance_embeds: bool = True, hidden: int = 32) -> Flux2Transformer2DModel:
    """A FLUX.2 [dev]-shaped transformer: 2 double- and 2 single-stream blocks, hidden size 32
    unless ``hidden`` (a multiple of 16) says otherwise, two heads of ``hidden / 2``, RoPE over
    four axes of ``hidden / 8``.

    Takes patchified latents [B, N, 128] and Mistral3 embeddings [B, L, 48] (three hidden states
    of width 16); random weights from torch's global RNG.  ``guidance_embeds=False`` gives a
    model without guidance embedding (like FLUX.2 [klein]).
    """
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=FLUX2_LATENT_CHANNELS * 4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=hidden // 2,
        num_attention_heads=2,
        joint_attention_dim=3 * MISTRAL_HIDDEN,
        axes_dims_rope=(hidden // 8,) * 4,
        guidance_embeds=guidance_embeds,
    ).eval()


def _flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2 [dev]'s scheduler config (Flux2Pipeline computes the resolution-dependent shift mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def build_tiny_flux2(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random FLUX.2 [dev]-shaped pipeline (``Flux2Pipeline``) to ``out_dir``.

    Like :func:`build_tiny_flux`: loads with ``Flux2Pipeline.from_pretrained``, weights depend
    only on ``seed``, the caller's RNG is untouched.  The tokenizer is saved as a plain tokenizer
    with its chat template (FLUX.2 [dev] ships a PixtralProcessor, which needs torchvision to
    load; flowtune loads only its tokenizer either way).
    """
    from diffusers import Flux2Pipeline

    tokenizer = _mistral_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, "text_encoder"))
        text_encoder = _mistral3_text_encoder(tokenizer)
        torch.manual_seed(_component_seed(seed, "vae"))
        vae = _flux2_vae()
        torch.manual_seed(_component_seed(seed, "transformer"))
        transformer = tiny_flux2_transformer()

    pipe = Flux2Pipeline(
        scheduler=_flux2_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def make_tiny(family: str, out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Build a tiny random pipeline of ``family`` into ``out_dir`` and return its resolved path.

    The pipeline is written to a temporary sibling directory and renamed into place, so an
    interrupted build never leaves a half-written model directory at ``out_dir`` (at most a
    hidden ``.<name>.tmp-*`` sibling).

    Args:
        family: A registered family name (see :mod:`flowtune.families`).
        out_dir: The directory to create.  It may exist if it is empty.
        seed: Seed for the random weights.
        overwrite: Replace ``out_dir`` if it exists and is not empty.

    Raises:
        FlowtuneError: Unknown family, ``out_dir`` is a file or a non-empty directory (without
            ``overwrite``), or its parent directory cannot be written.
    """
    spec = get_family(family)
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
        spec.load_tiny_builder()(staging, seed)
    return target
