"""FluxKontextAdapter: the transformer inputs equal what diffusers' FluxKontextPipeline builds,
references laid out on domain 1, and the loss covering only the target tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtune.flow_matching import FlowMatchingContext, FluxKontextAdapter, create_pipeline
from flowtune.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny_kontext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny("flux-kontext", tmp_path_factory.mktemp("kontext") / "tiny-kontext")


def _record_transformer_calls(pipe) -> list[dict]:
    calls: list[dict] = []

    def hook(module, args, kwargs):
        calls.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_adapter_inputs_equal_the_kontext_pipeline_s_at_the_same_step(tiny_kontext) -> None:
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(tiny_kontext, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    calls = _record_transformer_calls(pipe)
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    # Target 64x32 pixels, reference 80x48 kept at its own size (no auto resize): sizes differ.
    pipe(
        prompt="make it blue",
        image=source,
        height=32,
        width=64,
        max_area=64 * 32,
        _auto_resize=False,
        num_inference_steps=2,
        guidance_scale=2.5,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
    )
    call = calls[0]
    target_tokens = (32 // 16) * (64 // 16)
    reference_tokens = (48 // 16) * (80 // 16)
    assert call["hidden_states"].shape[1] == target_tokens + reference_tokens

    # The same step through the adapter, from the pipeline's own (unpacked) latents.
    adapter = FluxKontextAdapter(guidance_scale=2.5)
    noisy = adapter._unpack_latents(call["hidden_states"][:, :target_tokens], 32, 64)
    reference = adapter._unpack_latents(call["hidden_states"][:, target_tokens:], 48, 80)
    sigma = call["timestep"].float()
    context = FlowMatchingContext(
        noisy_latents=noisy,
        latents=torch.zeros_like(noisy),
        timesteps=sigma * 1000,
        sigma=sigma,
        task_type="t2v",
        data_type="image",
        device=torch.device("cpu"),
        dtype=torch.float32,
        batch={
            # the text conditioning passes through unchanged (FLUX.1's adapter, tested elsewhere)
            "text_embeddings": call["encoder_hidden_states"],
            "pooled_prompt_embeds": call["pooled_projections"],
            "control_latents_0": reference,
        },
    )
    inputs = adapter.prepare_inputs(context)
    assert torch.equal(inputs["hidden_states"], call["hidden_states"])
    assert torch.equal(inputs["img_ids"], call["img_ids"])
    assert torch.equal(inputs["txt_ids"], call["txt_ids"])
    assert torch.equal(inputs["encoder_hidden_states"], call["encoder_hidden_states"])
    assert torch.equal(inputs["pooled_projections"], call["pooled_projections"])
    assert torch.allclose(inputs["timestep"], call["timestep"])
    assert torch.equal(inputs["guidance"], call["guidance"])
    # The reference tokens sit on domain 1, the target on domain 0.
    assert (
        inputs["img_ids"][:target_tokens, 0].eq(0).all() and inputs["img_ids"][target_tokens:, 0].eq(1).all()
    )

    # The prediction is the pipeline's noise prediction, cut to the target tokens.
    with torch.no_grad():
        prediction = adapter.forward(pipe.transformer, inputs)
        full = pipe.transformer(**{k: v for k, v in call.items()})[0]
    assert prediction.shape == noisy.shape
    assert torch.allclose(prediction, adapter._unpack_latents(full[:, :target_tokens], 32, 64), atol=1e-6)


def test_several_references_form_a_mosaic_on_domain_1() -> None:
    adapter = FluxKontextAdapter()
    batch = {
        "control_latents_0": torch.zeros(1, 16, 4, 8),  # wide: 2 x 4 tokens
        "control_latents_1": torch.zeros(1, 16, 6, 2),  # tall: 3 x 1 tokens
        "control_latents_2": torch.zeros(1, 16, 4, 4),
    }
    tokens, ids = adapter._reference_tokens(batch, torch.device("cpu"), torch.float32)
    assert tokens.shape == (1, 8 + 3 + 4, 64)
    assert ids[:, 0].eq(1).all()
    first, second, third = ids[:8], ids[8:11], ids[11:]
    # Each reference goes below the mosaic so far, or right of it when below would make the
    # mosaic taller than right would make it wide (a tie goes below).
    assert (first[:, 1].min(), first[:, 2].min()) == (0, 0)
    assert (second[:, 1].min(), second[:, 2].min()) == (2, 0)  # below: 4 + 6 = 10, not > 8 + 2
    assert (third[:, 1].min(), third[:, 2].min()) == (0, 4)  # right: 10 + 4 > 8 + 4
    # within a reference, rows and columns count up from its offset
    assert second[:, 1].tolist() == [2, 3, 4] and first[:, 2].tolist() == [0, 1, 2, 3] * 2


def test_the_loss_covers_only_the_target_and_a_batch_without_references_is_refused() -> None:
    class Echo(torch.nn.Module):
        config = type("C", (), {"guidance_embeds": False})()

        def forward(self, hidden_states, return_dict=False, **kwargs):
            return (hidden_states * 2.0,)

    flow = create_pipeline("flux_kontext", {"use_guidance_embeds": True}, cfg_dropout_prob=0.0)
    g = torch.Generator().manual_seed(0)
    batch = {
        "image_latents": torch.randn(2, 16, 4, 4, generator=g),
        "text_embeddings": torch.randn(2, 5, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(2, 32, generator=g),
        "control_latents_0": torch.randn(2, 16, 6, 4, generator=g),
    }
    weighted, loss, _, _ = flow.step(
        Echo(), batch, dtype=torch.float32, generator=torch.Generator().manual_seed(1)
    )
    assert weighted.shape == (2, 16, 4, 4)  # the target's latents, not the references'
    with pytest.raises(KeyError, match="control_latents_0"):
        flow.step(Echo(), {k: v for k, v in batch.items() if k != "control_latents_0"}, dtype=torch.float32)


def test_rank_errors_name_the_adapter_and_dropout_spares_the_reference() -> None:
    latents = torch.randn(2, 16, 4, 4)
    batch = {
        "text_embeddings": torch.randn(2, 5, 32),
        "pooled_prompt_embeds": torch.randn(2, 32),
        "control_latents_0": torch.randn(2, 16, 4, 4),
    }
    context = FlowMatchingContext(
        noisy_latents=latents,
        latents=latents,
        timesteps=torch.full((2,), 500.0),
        sigma=torch.full((2,), 0.5),
        task_type="t2v",
        data_type="image",
        device=torch.device("cpu"),
        dtype=torch.float32,
        batch=batch,
        cfg_dropout_prob=1.0,  # called directly, no pipeline mask: the probability applies
    )
    inputs = FluxKontextAdapter().prepare_inputs(context)
    assert inputs["encoder_hidden_states"].abs().sum() == 0 and inputs["pooled_projections"].abs().sum() == 0
    assert torch.equal(
        inputs["hidden_states"][:, 4:], FluxKontextAdapter()._pack_latents(batch["control_latents_0"])
    )
    context.noisy_latents = torch.randn(2, 16, 1, 4, 4)
    with pytest.raises(ValueError, match="FluxKontextAdapter expects 4D latents"):
        FluxKontextAdapter().prepare_inputs(context)
