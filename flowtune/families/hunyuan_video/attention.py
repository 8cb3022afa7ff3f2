"""HunyuanVideo 1.5's joint attention with its text padding masked as keys only
(``FamilySpec.transformer_patch``: :func:`patch_transformer`).

diffusers' ``HunyuanVideo15AttnProcessor2_0`` masks the padding of the text tokens with a dense
boolean mask [B, 1, S, S] over all S = video + text tokens, built in every block: the key mask
repeated over every query row, and-ed with its own transpose.  For a 121-frame 480p clip (S =
51,764) each boolean is 2.5 GiB, and the attention kernel turns it into an additive bf16 mask of
5 GiB: about 10 GiB at the attention of every block, forward and recomputation alike.

:class:`KeyMaskAttnProcessor` computes the same attention with the key mask alone, [B, S]
(diffusers' attention dispatch broadcasts it as [B, 1, 1, S]).  The rows of valid queries, every
video token's and every valid text token's, are the same: they see the same keys.  Only the rows
of padding queries differ (under the dense mask they see no key and come out as zeros); no valid
token attends to a padding token in any block and the output reads only the video tokens, so the
transformer's output and every gradient of the loss stay the same (tests/test_family_contract.py
checks sampling against the diffusers pipeline bit for bit; tests/test_hunyuan_video.py checks
the training step's outputs and LoRA gradients).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class KeyMaskAttnProcessor:
    """The attention of a HunyuanVideo 1.5 double-stream block (video tokens [B, N, D], text
    tokens [B, T, D], a key mask of the text [B, T]) -> (video [B, N, D], text [B, T, D]), as
    ``HunyuanVideo15AttnProcessor2_0`` computes it but for the mask (see the module docstring)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, S, heads, D / heads]
            return x.unflatten(2, (attn.heads, -1))

        query = attn.norm_q(split_heads(attn.to_q(hidden_states)))
        key = attn.norm_k(split_heads(attn.to_k(hidden_states)))
        value = split_heads(attn.to_v(hidden_states))
        if image_rotary_emb is not None:  # the video tokens' rotary embedding
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if encoder_hidden_states is not None:  # the text tokens follow the video tokens
            text_query = split_heads(attn.add_q_proj(encoder_hidden_states))
            text_key = split_heads(attn.add_k_proj(encoder_hidden_states))
            text_value = split_heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=1)
            key = torch.cat([key, text_key], dim=1)
            value = torch.cat([value, text_value], dim=1)

        # Every video token is valid: the text's key mask [B, T] padded in front to [B, S].
        tokens = query.shape[1]
        keys = F.pad(attention_mask, (tokens - attention_mask.shape[1], 0), value=True).bool()
        out = dispatch_attention_fn(
            query, key, value, attn_mask=keys, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )  # fmt: skip
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:  # as diffusers' processor: no output projection then
            return out, None
        text = encoder_hidden_states.shape[1]
        video_out, text_out = out[:, :-text], out[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def patch_transformer(transformer: torch.nn.Module) -> None:
    """Give every double-stream block of a ``HunyuanVideo15Transformer3DModel`` a
    :class:`KeyMaskAttnProcessor` (the token refiner's attention is left as it is)."""
    for block in transformer.transformer_blocks:
        block.attn.set_processor(KeyMaskAttnProcessor())
