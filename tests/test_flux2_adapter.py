"""Flux2Adapter: the seed-001 API, and transformer inputs equal to what diffusers' Flux2Pipeline
builds at the same step, text-to-image and with one or two reference images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flowtune.families.flux2.tiny import tiny_flux2_transformer
from flowtune.flow_matching import Flux2Adapter, create_adapter, create_pipeline
from flowtune.tiny import make_tiny
from tests.helpers import image_context


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):
    from diffusers import Flux2Pipeline

    model = make_tiny("flux2", tmp_path_factory.mktemp("flux2") / "tiny-flux2")
    pipe = Flux2Pipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------ the seed API


def test_pack_and_unpack_are_inverse_and_row_major() -> None:
    latents = torch.randn(2, 128, 3, 5)
    packed = Flux2Adapter._pack_latents(latents)
    assert packed.shape == (2, 15, 128)
    assert torch.equal(packed[1, 5 * 2 + 4], latents[1, :, 2, 4])  # token of row 2, column 4
    assert torch.equal(Flux2Adapter._unpack_latents(packed, 3, 5), latents)
    with pytest.raises(ValueError, match="15 tokens into a 5x5 grid"):
        Flux2Adapter._unpack_latents(packed, 5, 5)


def test_ids_are_4d_long_and_equal_the_pipeline_s() -> None:
    from diffusers import Flux2Pipeline

    ids = Flux2Adapter._prepare_latent_ids(3, 5, 2, torch.device("cpu"))
    assert ids.shape == (2, 15, 4) and ids.dtype == torch.long
    assert ids[0, 5 * 2 + 4].tolist() == [0, 2, 4, 0]  # (T, h, w, L)
    assert torch.equal(ids, Flux2Pipeline._prepare_latent_ids(torch.zeros(2, 128, 3, 5)))

    text_ids = Flux2Adapter._prepare_text_ids(7, 2, torch.device("cpu"))
    assert text_ids.shape == (2, 7, 4) and text_ids.dtype == torch.long
    assert text_ids[1, 6].tolist() == [0, 0, 0, 6]
    assert torch.equal(text_ids, Flux2Pipeline._prepare_text_ids(torch.zeros(2, 7, 48)))


def test_created_by_name_with_the_seed_defaults() -> None:
    adapter = create_adapter("flux2")
    assert isinstance(adapter, Flux2Adapter)
    assert adapter.guidance_scale == 3.5 and adapter.use_guidance_embeds is True


def test_guidance_only_for_models_with_guidance_embeddings() -> None:
    torch.manual_seed(0)
    batch = {"text_embeddings": torch.randn(1, 6, 48)}
    context = image_context(torch.randn(1, 128, 2, 2), torch.tensor([0.5]), batch)
    seen: list = []

    def record(module, args, kwargs):
        seen.append(kwargs["guidance"])

    for guidance_embeds, expected in ((True, [3.5]), (False, None)):
        model = tiny_flux2_transformer(guidance_embeds=guidance_embeds)
        model.register_forward_pre_hook(record, with_kwargs=True)
        adapter = Flux2Adapter()
        pred = adapter.forward(model, adapter.prepare_inputs(context))
        assert pred.shape == (1, 128, 2, 2)
        assert (seen[-1] is None) if expected is None else seen[-1].tolist() == expected
    with pytest.raises(ValueError, match="cannot run without guidance"):
        adapter = Flux2Adapter(use_guidance_embeds=False)
        adapter.forward(tiny_flux2_transformer(), adapter.prepare_inputs(context))


def test_cfg_dropout_zeroes_only_the_dropped_samples_text() -> None:
    text = torch.randn(2, 6, 48)
    context = image_context(torch.randn(2, 128, 2, 2), torch.tensor([0.3, 0.6]), {"text_embeddings": text})
    context.cfg_dropout_mask = torch.tensor([True, False])
    inputs = Flux2Adapter().prepare_inputs(context)
    assert torch.equal(inputs["encoder_hidden_states"][0], torch.zeros(6, 48))
    assert torch.equal(inputs["encoder_hidden_states"][1], text[1])


def test_cfg_dropout_prob_is_honoured_when_called_directly() -> None:
    text = torch.randn(3, 6, 48)
    context = image_context(torch.randn(3, 128, 2, 2), torch.full((3,), 0.5), {"text_embeddings": text})
    context.cfg_dropout_prob = 1.0
    assert Flux2Adapter().prepare_inputs(context)["encoder_hidden_states"].abs().sum() == 0
    context.cfg_dropout_mask = torch.tensor([False, True, False])  # the pipeline's mask wins
    inputs = Flux2Adapter().prepare_inputs(context)
    assert torch.equal(inputs["encoder_hidden_states"][0], text[0])
    assert inputs["encoder_hidden_states"][1].abs().sum() == 0


def test_latents_of_the_wrong_rank_and_unbatched_text() -> None:
    text = torch.randn(6, 48)  # [L, D] for a batch of one
    context = image_context(torch.randn(1, 128, 2, 2), torch.tensor([0.5]), {"text_embeddings": text})
    inputs = Flux2Adapter().prepare_inputs(context)
    assert torch.equal(inputs["encoder_hidden_states"], text[None])
    assert inputs["txt_ids"].shape == (1, 6, 4)
    context.noisy_latents = torch.randn(1, 128, 1, 2, 2)
    with pytest.raises(
        ValueError, match=r"Flux2Adapter expects 4D patchified latents \[B, C, H_p, W_p\], got 5D"
    ):
        Flux2Adapter().prepare_inputs(context)


# --------------------------------------------------------------- parity with Flux2Pipeline


def _pipeline_step(
    pipe, images: list[Image.Image] | None, height: int, width: int
) -> tuple[dict, torch.Tensor]:
    """The first transformer call of Flux2Pipeline (its keyword inputs) and its output."""
    calls: list[dict] = []
    outputs: list[torch.Tensor] = []
    pre = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kw.items()}),
        with_kwargs=True,
    )
    post = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    try:
        pipe(
            prompt="make the circle blue",
            image=images,
            height=height,
            width=width,
            num_inference_steps=2,
            guidance_scale=2.5,
            max_sequence_length=48,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    finally:
        pre.remove()
        post.remove()
    return calls[0], outputs[0]


def _reference_latents(pipe, image: Image.Image) -> torch.Tensor:
    """A reference as Flux2Pipeline encodes it (its size already a multiple of 16, under 1 MP)."""
    pixels = pipe.image_processor.preprocess(
        image, height=image.height, width=image.width, resize_mode="crop"
    )
    return pipe._encode_vae_image(pixels, generator=None)


@pytest.mark.parametrize("reference_sizes", [(), ((96, 80),), ((96, 80), (64, 128))])
def test_inputs_and_prediction_equal_the_pipeline_s_at_the_same_step(pipe, reference_sizes) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in reference_sizes]
    height, width = 48, 64  # target 3 x 4 tokens; references differ in size from it and each other
    call, output = _pipeline_step(pipe, images or None, height, width)
    target_tokens = (height // 16) * (width // 16)

    adapter = Flux2Adapter(guidance_scale=2.5)
    noisy = adapter._unpack_latents(call["hidden_states"][:, :target_tokens], height // 16, width // 16)
    batch = {"text_embeddings": call["encoder_hidden_states"]}
    batch |= {f"control_latents_{k}": _reference_latents(pipe, image) for k, image in enumerate(images)}
    inputs = adapter.prepare_inputs(image_context(noisy, call["timestep"], batch))

    for key in ("hidden_states", "img_ids", "txt_ids", "encoder_hidden_states", "timestep", "guidance"):
        assert inputs[key].dtype == call[key].dtype, key
        assert torch.equal(inputs[key], call[key]), key
    if images:
        time_coords = inputs["img_ids"][0, target_tokens:, 0].unique().tolist()
        assert time_coords == [10 * (k + 1) for k in range(len(images))]
    pred = adapter.forward(pipe.transformer, inputs)
    expected = adapter._unpack_latents(output[:, :target_tokens], height // 16, width // 16)
    assert pred.shape == (1, 128, height // 16, width // 16)
    assert torch.equal(pred, expected)


def test_loss_covers_only_the_target_tokens_and_depends_on_the_reference(pipe) -> None:
    flow = create_pipeline("flux2", {"guidance_scale": 2.5})
    torch.manual_seed(0)
    batch = {
        "image_latents": torch.randn(1, 128, 2, 3),
        "text_embeddings": torch.randn(1, 8, 48),
        "control_latents_0": torch.randn(1, 128, 4, 4),
    }
    losses = []
    for reference in (batch["control_latents_0"], torch.zeros(1, 128, 4, 4)):
        weighted, _, _, _ = flow.step(
            pipe.transformer,
            {**batch, "control_latents_0": reference},
            dtype=torch.float32,
            generator=torch.Generator().manual_seed(1),
        )
        assert weighted.shape == (1, 128, 2, 3)  # the target's latents, not the reference's
        losses.append(weighted)
    assert not torch.equal(losses[0], losses[1])


def test_the_lean_feed_forward_activation_changes_no_prediction_or_gradient() -> None:
    """The family's transformer patch (one ``chunk`` instead of two slices in every SwiGLU):
    the same prediction and gradients as diffusers' own, bit for bit, and a backward with one
    gradient of the activation's input [..., 2F] alive instead of three."""
    from diffusers.models.transformers.transformer_flux2 import Flux2SwiGLU

    from flowtune.families import get_family
    from flowtune.families.flux2.lean import ChunkedSwiGLU
    from flowtune.memory.plan import LiveBytes

    torch.manual_seed(0)
    theirs = tiny_flux2_transformer()
    ours = get_family("flux2").patch_transformer(tiny_flux2_transformer())
    ours.load_state_dict(theirs.state_dict())
    assert {type(m) for m in ours.modules()} >= {ChunkedSwiGLU} and Flux2SwiGLU not in map(
        type, ours.modules()
    )
    context = image_context(
        torch.randn(1, 128, 2, 3), torch.tensor([0.3]), {"text_embeddings": torch.randn(1, 8, 48)}
    )
    inputs = Flux2Adapter().prepare_inputs(context)
    weight = torch.randn(1, 128, 2, 3)
    results = []
    for model in (theirs, ours):
        pred = Flux2Adapter().forward(model, inputs)
        (pred * weight).sum().backward()
        results.append((pred.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (pred, grads), (our_pred, our_grads) = results
    assert torch.equal(our_pred, pred)
    assert all(torch.equal(our_grads[n], g) for n, g in grads.items())

    x = torch.randn(64, 2 * 256, requires_grad=True)
    peaks = []
    for activation in (Flux2SwiGLU(), ChunkedSwiGLU()):
        y = activation(x)
        with LiveBytes() as live:
            y.backward(torch.ones_like(y))
        peaks.append(live.peak)
    assert peaks[1] + x.numel() * 4 <= peaks[0]  # at least one [64, 512] float32 tensor fewer
