"""Dropping from a text encoder what encoding captions never runs.

A family's pipeline often encodes captions with a whole language model and reads only some of its
hidden states: FLUX.2 [dev] runs Mistral Small 3's 40 layers, its vocabulary head and, loaded
beside them, its vision tower, and stacks hidden states 10, 20 and 30.  What comes after the
highest hidden state it reads and the head's logits ([B, L, vocabulary], larger than any hidden
state) change nothing in the embeddings; dropping them before the encoder is quantized and moved
to the accelerator saves their weights there (a quarter of Mistral3's) and the logits' memory.
A family's :meth:`flowtune.encoders.FamilyEncoder.prune_text_encoder` says what to drop with
the functions here; the embeddings stay the pipeline's bit for bit (``flowtune sample`` and
validation images equal the family's diffusers pipeline: tests/test_family_contract.py).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def keep_hidden_states_through(model: Any, highest: int) -> int:
    """Drop the decoder layers of transformers language model ``model`` that its hidden state
    ``highest`` does not need; return how many were dropped.

    transformers' ``hidden_states`` of a model with n decoder layers are: [0] the input
    embeddings, [k] the output of layer k - 1 for 0 < k < n, and [n] the final norm of the last
    layer's output.  Keeping ``highest + 1`` layers leaves [0] .. [highest] as they were
    ([highest + 1] becomes a final norm no reader asks for); the decoder runs
    ``layers[:config.num_hidden_layers]``, so the shorter list is all it runs.
    """
    layers = model.get_decoder().layers
    keep = highest + 1
    dropped = max(0, len(layers) - keep)
    if dropped:
        del layers[keep:]
    return dropped


def drop_output_head(model: Any) -> bool:
    """Replace the vocabulary head (``lm_head``) of transformers causal or conditional-generation
    model ``model`` by an identity, so that its forward returns the last hidden state as
    ``logits`` instead of computing [B, L, vocabulary] logits; False if it has none."""
    if getattr(model, "lm_head", None) is None:
        return False
    model.lm_head = nn.Identity()
    return True


def drop_submodules(model: nn.Module, names: tuple[str, ...]) -> None:
    """Set each of ``model``'s submodules ``names`` (dotted paths, e.g. ``model.vision_tower``)
    to None: modules the forward runs only for inputs the encoding never gives (images)."""
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if getattr(parent, attribute, None) is not None:
            setattr(parent, attribute, None)
