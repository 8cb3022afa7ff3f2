"""A stand-in for ``HunyuanVideo15Transformer3DModel.forward`` that ``flowtune plan`` traces on fake
tensors (``FamilySpec.plan_forward``); training and sampling run diffusers' own forward.

diffusers' forward reads two things from its inputs' values, which a fake tensor has none of:
whether every image embedding is zero (``torch.all(image_embeds == 0)``: the text-to-video
branch, whose image tokens are zeroed and masked out), and which text positions are real, to
move them before the padding (boolean indexing per sample: shapes made from values).
:func:`traceable_forward` runs the same modules on tensors of the same shapes without reading a
value:

- the branch becomes arithmetic: the image tokens are multiplied by, and masked with, "some
  image embedding is not zero" (a 0-dim bool tensor);
- the text sequence is ``[image tokens, ByT5 tokens, Qwen2.5-VL tokens]`` in their own order
  with their masks, the padding of the two texts zeroed, instead of the real tokens of the three
  first and the padding after: the same tokens, tensor shapes and attention mask ([B, L] -> the
  blocks' [B, 1, L', L']), only the order of the text positions differs, and no position
  encoding reaches the text tokens, so the video prediction is the same up to the order of
  floating-point sums (``tests/test_hunyuan_video.py`` checks it against diffusers' forward).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import HunyuanVideo15Transformer3DModel

# cond_type_embed's rows: Qwen2.5-VL text, ByT5 glyph text, SigLIP image tokens.
_TEXT, _GLYPH, _IMAGE = 0, 1, 2


def _typed(model: HunyuanVideo15Transformer3DModel, tokens: torch.Tensor, kind: int) -> torch.Tensor:
    """``tokens`` [B, N, D] plus the embedding of their condition type."""
    return tokens + model.cond_type_embed(torch.full_like(tokens[:, :, 0], kind, dtype=torch.long))


def traceable_forward(
    self: HunyuanVideo15Transformer3DModel,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor,
    timestep_r: torch.Tensor | None = None,
    encoder_hidden_states_2: torch.Tensor | None = None,
    encoder_attention_mask_2: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    attention_kwargs: dict[str, Any] | None = None,
    return_dict: bool = True,
) -> Any:
    """``HunyuanVideo15Transformer3DModel.forward``'s arguments and result (the velocity
    prediction [B, C_out, F, H, W]), computed without reading an input's values (module doc).

    Args:
        hidden_states: [B, C_in, F, H, W] latents, condition latents and mask channel.
        timestep: [B].
        encoder_hidden_states / encoder_attention_mask: [B, L1, D1] Qwen2.5-VL text and [B, L1].
        encoder_hidden_states_2 / encoder_attention_mask_2: [B, L2, D2] ByT5 text and [B, L2].
        image_embeds: [B, N, D3] SigLIP embeddings (zeros for text-to-video).
        attention_kwargs: Ignored (diffusers reads a LoRA scale from it; the plan passes none).
    """
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    b, _, frames, height, width = hidden_states.shape
    pt, p = self.config.patch_size_t, self.config.patch_size
    rotary = self.rope(hidden_states)
    temb = self.time_embed(timestep, timestep_r=timestep_r)
    video = self.x_embedder(hidden_states)  # [B, F' H' W', D]

    text = _typed(self, self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask), _TEXT)
    glyph = _typed(self, self.context_embedder_2(encoder_hidden_states_2), _GLYPH)
    has_image = image_embeds.ne(0).any()  # diffusers' "not t2v", kept as a tensor
    image = _typed(self, self.image_embedder(image_embeds) * has_image.to(video.dtype), _IMAGE)
    text_mask = encoder_attention_mask.bool()
    glyph_mask = encoder_attention_mask_2.bool()
    image_mask = has_image.expand(b, image.shape[1])
    context = torch.cat([image, glyph * glyph_mask[..., None], text * text_mask[..., None]], dim=1)
    context_mask = torch.cat([image_mask, glyph_mask, text_mask], dim=1)

    checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing
    for block in self.transformer_blocks:
        if checkpointing:
            video, context = self._gradient_checkpointing_func(
                block, video, context, temb, context_mask, rotary
            )
        else:
            video, context = block(video, context, temb, context_mask, rotary)

    video = self.proj_out(self.norm_out(video, temb))  # [B, F' H' W', C_out pt p p]
    video = video.unflatten(1, (frames // pt, height // p, width // p)).unflatten(-1, (-1, pt, p, p))
    video = video.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, -1, frames, height, width)
    return Transformer2DModelOutput(sample=video) if return_dict else (video,)
