"""The flow-matching core against its formulas, its distributions and diffusers' FLUX helpers."""

from __future__ import annotations

import math
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from diffusers import FluxPipeline, FluxTransformer2DModel

from flowtune.families import FAMILIES
from flowtune.families.flux.tiny import tiny_flux_transformer
from flowtune.flow_matching import (
    FlowMatchingContext,
    FlowMatchingPipeline,
    FluxAdapter,
    FluxKontextAdapter,
    LinearInterpolationSchedule,
    LossExplosionError,
    SimpleAdapter,
    create_adapter,
    create_pipeline,
)

N_DRAWS = 100_000
QUANTILES = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])


def normal_ppf(q: float) -> float:
    return NormalDist().inv_cdf(q)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def draw_sigma(**kwargs) -> torch.Tensor:
    pipe = FlowMatchingPipeline(SimpleAdapter(), **kwargs)
    sigma, timesteps, _ = pipe.sample_timesteps(N_DRAWS, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(timesteps, sigma * pipe.num_train_timesteps)
    return sigma


def empirical_quantiles(x: torch.Tensor) -> torch.Tensor:
    return torch.quantile(x.double(), QUANTILES.double()).float()


# ---------------------------------------------------------------- interpolation and shift


def test_linear_interpolation_hand_values():
    x0 = torch.full((2, 1, 2, 2), 2.0)
    x1 = torch.full((2, 1, 2, 2), -1.0)
    xt = LinearInterpolationSchedule().forward(x0, x1, torch.tensor([0.25, 1.0]))
    assert torch.allclose(xt[0], torch.full((1, 2, 2), 0.75 * 2 + 0.25 * -1))
    assert torch.allclose(xt[1], x1[1])


def test_flow_shift_formula_hand_values(monkeypatch):
    # No uniform mixing: every sample goes through the shift formula (mix_uniform_ratio would
    # replace about one in ten with an unshifted uniform draw).
    pipe = FlowMatchingPipeline(SimpleAdapter(), flow_shift=3.0, mix_uniform_ratio=0.0)
    u = torch.tensor([0.5, 0.25, 1e-9, 1.0])
    monkeypatch.setattr(pipe, "_sample_from_distribution", lambda *a, **k: u)
    sigma, timesteps, method = pipe.sample_timesteps(4)
    # sigma = 3 / (3 + 1/u - 1); u is clamped to >= 1e-5 first
    expected = torch.tensor([3 / 4, 3 / 6, 3 / (3 + 1e5 - 1), 1.0])
    assert torch.allclose(sigma, expected, rtol=1e-5)
    assert torch.allclose(timesteps, expected * 1000, rtol=1e-5)
    assert method == "logit_normal"


def test_sigma_clamping():
    sigma = draw_sigma(timestep_sampling="uniform", flow_shift=1.0, sigma_min=0.2, sigma_max=0.7)
    assert sigma.min() == pytest.approx(0.2) and sigma.max() == pytest.approx(0.7)
    assert 0.2 < sigma.median() < 0.7


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowMatchingPipeline(SimpleAdapter(), timestep_sampling="banana")
    with pytest.raises(ValueError, match="loss_weighting_scheme"):
        FlowMatchingPipeline(SimpleAdapter(), loss_weighting_scheme="cubic")
    with pytest.raises(ValueError, match="sigma_min"):
        FlowMatchingPipeline(SimpleAdapter(), sigma_min=0.8, sigma_max=0.2)


# ---------------------------------------------------------------- distributions (100k draws)


def test_uniform_distribution():
    sigma = draw_sigma(timestep_sampling="uniform", flow_shift=1.0)
    assert torch.allclose(empirical_quantiles(sigma), QUANTILES, atol=0.01)


def test_uniform_with_shift_distribution():
    s = 3.0
    sigma = draw_sigma(timestep_sampling="uniform", flow_shift=s)
    # sigma = s u / (1 + (s - 1) u) is increasing in u, so quantiles map through it
    expected = s * QUANTILES / (1 + (s - 1) * QUANTILES)
    assert torch.allclose(empirical_quantiles(sigma), expected, atol=0.01)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.7)])
def test_logit_normal_distribution(mean, std):
    sigma = draw_sigma(
        timestep_sampling="logit_normal",
        flow_shift=1.0,
        logit_mean=mean,
        logit_std=std,
        mix_uniform_ratio=0.0,
    )
    expected = torch.tensor([sigmoid(mean + std * normal_ppf(q)) for q in QUANTILES.tolist()])
    assert torch.allclose(empirical_quantiles(sigma), expected, atol=0.01)


def test_lognorm_distribution_ignores_logit_parameters():
    sigma = draw_sigma(
        timestep_sampling="lognorm", flow_shift=1.0, logit_mean=2.0, logit_std=3.0, mix_uniform_ratio=0.0
    )
    expected = torch.tensor([sigmoid(normal_ppf(q)) for q in QUANTILES.tolist()])
    assert torch.allclose(empirical_quantiles(sigma), expected, atol=0.01)


def test_mode_distribution():
    scale = 1.29
    sigma = draw_sigma(timestep_sampling="mode", flow_shift=1.0, mix_uniform_ratio=0.0)

    def f(v: float) -> float:  # decreasing on [0, 1], so the q-quantile of u is f(1 - q)
        return 1 - v - scale * (math.cos(math.pi * v / 2) ** 2 - 1 + v)

    expected = torch.tensor([f(1 - q) for q in QUANTILES.tolist()])
    assert torch.allclose(empirical_quantiles(sigma), expected, atol=0.01)


def test_mix_distribution_is_per_sample_mixture():
    r = 0.3
    sigma = draw_sigma(timestep_sampling="mix", flow_shift=1.0, mix_uniform_ratio=r)
    for x in (0.05, 0.2, 0.5, 0.8, 0.95):
        cdf = r * x + (1 - r) * NormalDist().cdf(math.log(x / (1 - x)))
        assert (sigma <= x).float().mean().item() == pytest.approx(cdf, abs=0.01)


@pytest.mark.parametrize("method", ["logit_normal", "mode"])
def test_mix_uniform_ratio_mixes_uniform_draws_into_every_strategy(method):
    """As the reference's marginal: u ~ U(0, 1) with probability mix_uniform_ratio, else the
    strategy's own distribution; here decided per sample."""
    r = 0.4
    mixed = draw_sigma(timestep_sampling=method, flow_shift=1.0, logit_mean=0.5, mix_uniform_ratio=r)
    pure = draw_sigma(timestep_sampling=method, flow_shift=1.0, logit_mean=0.5, mix_uniform_ratio=0.0)
    for x in (0.02, 0.2, 0.5, 0.8, 0.98):
        cdf = r * x + (1 - r) * (pure <= x).float().mean().item()
        assert (mixed <= x).float().mean().item() == pytest.approx(cdf, abs=0.01)


def test_mixing_is_per_sample_from_the_per_sample_generators():
    pipe = FlowMatchingPipeline(SimpleAdapter(), timestep_sampling="logit_normal", mix_uniform_ratio=0.5)

    def gens(ids):
        return [torch.Generator().manual_seed(50 + i) for i in ids]

    whole, _, _ = pipe.sample_timesteps(8, generator=gens(range(8)))
    halves = [pipe.sample_timesteps(4, generator=gens(range(8)[s]))[0] for s in (slice(0, 4), slice(4, 8))]
    assert torch.equal(whole, torch.cat(halves))
    # each sample picks for itself: with p = 0.5 a batch of 8 is almost never all one kind
    unmixed, _, _ = FlowMatchingPipeline(SimpleAdapter(), mix_uniform_ratio=0.0).sample_timesteps(
        8, generator=gens(range(8))
    )
    same = whole == unmixed
    assert 0 < same.sum().item() < 8


def test_beta_sampling_is_the_configured_beta_with_no_shift_and_no_mixing():
    a, b = 2.5, 1.5
    # flow_shift and mix_uniform_ratio do not apply to beta (the reference samples sigma directly)
    sigma = draw_sigma(
        timestep_sampling="beta", beta_alpha=a, beta_beta=b, flow_shift=3.0, mix_uniform_ratio=0.5
    )
    assert sigma.mean().item() == pytest.approx(a / (a + b), abs=0.004)
    assert sigma.var().item() == pytest.approx(a * b / ((a + b) ** 2 * (a + b + 1)), abs=0.002)
    # the median of Beta(2, 2) is 1/2 and its CDF at 1/4 is 3 (1/4)^2 - 2 (1/4)^3 = 5/32
    sym = draw_sigma(timestep_sampling="beta", beta_alpha=2.0, beta_beta=2.0)
    assert sym.median().item() == pytest.approx(0.5, abs=0.01)
    assert (sym <= 0.25).float().mean().item() == pytest.approx(5 / 32, abs=0.01)
    pipe = FlowMatchingPipeline(SimpleAdapter(), timestep_sampling="beta", sigma_min=0.3, sigma_max=0.6)
    clamped, timesteps, method = pipe.sample_timesteps(1000, generator=torch.Generator().manual_seed(0))
    assert method == "beta" and clamped.min() >= 0.3 and clamped.max() <= 0.6
    assert torch.allclose(timesteps, clamped * 1000)


def test_beta_sampling_draws_what_torch_beta_draws_and_from_per_sample_generators():
    pipe = FlowMatchingPipeline(SimpleAdapter(), timestep_sampling="beta", beta_alpha=0.7, beta_beta=3.0)
    torch.manual_seed(11)
    sigma, _, _ = pipe.sample_timesteps(16, "cpu")
    torch.manual_seed(11)
    expected = torch.distributions.Beta(torch.full((16,), 0.7), torch.full((16,), 3.0)).sample()
    assert torch.equal(sigma, expected)  # the reference's draws under the same global seed

    def gens(ids):
        return [torch.Generator().manual_seed(7 + i) for i in ids]

    whole, _, _ = pipe.sample_timesteps(4, generator=gens(range(4)))
    halves = [pipe.sample_timesteps(2, generator=gens(range(4)[s]))[0] for s in (slice(0, 2), slice(2, 4))]
    assert torch.equal(whole, torch.cat(halves))


@pytest.mark.parametrize("alpha,beta", [(0.0, 1.5), (2.5, -1.0)])
def test_beta_parameters_must_be_positive(alpha, beta):
    with pytest.raises(ValueError, match="beta_alpha and beta_beta must both be positive"):
        FlowMatchingPipeline(SimpleAdapter(), beta_alpha=alpha, beta_beta=beta)


def test_use_sigma_noise_false_is_plain_uniform():
    pipe = FlowMatchingPipeline(SimpleAdapter(), use_sigma_noise=False, flow_shift=5.0)
    sigma, _, method = pipe.sample_timesteps(N_DRAWS, generator=torch.Generator().manual_seed(1))
    assert method == "uniform_no_shift"
    assert torch.allclose(empirical_quantiles(sigma), QUANTILES, atol=0.01)


# ---------------------------------------------------------------- loss and weighting


def test_bsmntw_table_hand_values():
    pipe = FlowMatchingPipeline(SimpleAdapter(), num_train_timesteps=4, loss_weighting_scheme="bsmntw")
    # exp(-2 ((t - 2) / 4)^2) = e^-0.5, e^-0.125, 1, e^-0.125; minus min; scaled to sum 4
    raw = [math.exp(-0.5), math.exp(-0.125), 1.0, math.exp(-0.125)]
    shifted = [v - min(raw) for v in raw]
    expected = torch.tensor([v * 4 / sum(shifted) for v in shifted])
    assert torch.allclose(pipe._build_bsmntw_weights(), expected, atol=1e-6)
    table = FlowMatchingPipeline(SimpleAdapter(), loss_weighting_scheme="bsmntw")._build_bsmntw_weights()
    assert table.shape == (1000,) and table.sum().item() == pytest.approx(1000.0, rel=1e-5)
    assert table.argmax().item() == 500 and table.min().item() == 0.0


def test_linear_loss_weighting():
    pipe = FlowMatchingPipeline(SimpleAdapter(), flow_shift=3.0)
    pred, target = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)  # squared error 4
    sigma = torch.tensor([0.0, 0.5])
    weighted, avg_w, unweighted, avg_u, weight, mask = pipe.compute_loss(pred, target, sigma)
    assert torch.equal(weight.flatten(), torch.tensor([1.0, 2.5]))
    assert torch.equal(weighted[0], torch.full((1, 2, 2), 4.0)) and torch.equal(
        weighted[1], torch.full((1, 2, 2), 10.0)
    )
    assert avg_w.item() == pytest.approx(7.0) and avg_u.item() == pytest.approx(4.0)
    assert unweighted.shape == pred.shape and mask is None


def test_bsmntw_loss_weighting_indexes_table_by_timestep():
    pipe = FlowMatchingPipeline(SimpleAdapter(), loss_weighting_scheme="bsmntw")
    table = pipe._build_bsmntw_weights()
    _, _, _, _, weight, _ = pipe.compute_loss(
        torch.zeros(3, 4), torch.ones(3, 4), torch.tensor([0.0, 0.5, 1.0])
    )
    assert torch.equal(weight.flatten(), table[torch.tensor([0, 500, 999])])


def test_no_loss_weighting():
    pipe = FlowMatchingPipeline(SimpleAdapter(), use_loss_weighting=False)
    _, avg_w, _, avg_u, weight, _ = pipe.compute_loss(
        torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([0.2, 0.9])
    )
    assert torch.equal(weight.flatten(), torch.ones(2)) and avg_w.item() == avg_u.item() == 1.0


def test_loss_mask_is_a_masked_mean():
    pipe = FlowMatchingPipeline(SimpleAdapter(), use_loss_weighting=False)
    target = torch.zeros(1, 2, 2, 2)
    target[..., 0, :] = 1.0  # top row error 1, bottom row error 0
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # [B, H, W]: only the top row counts
    _, avg_w, _, avg_u, _, returned = pipe.compute_loss(
        torch.zeros_like(target), target, torch.zeros(1), {"loss_mask": mask}
    )
    assert avg_w.item() == pytest.approx(1.0) and avg_u.item() == pytest.approx(1.0)
    assert returned is mask
    _, unmasked, *_ = pipe.compute_loss(torch.zeros_like(target), target, torch.zeros(1))
    assert unmasked.item() == pytest.approx(0.5)


# ---------------------------------------------------------------- step


class EchoModel(nn.Module):
    """Predicts ``scale * hidden_states`` and records its inputs (a stand-in transformer)."""

    def __init__(self, guidance_embeds: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.config = SimpleNamespace(guidance_embeds=guidance_embeds)
        self.calls: list[dict] = []

    def forward(self, hidden_states, return_dict=True, **kwargs):
        self.calls.append({"hidden_states": hidden_states, **kwargs})
        return (hidden_states * self.scale,)


def simple_batch(b: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image_latents": torch.randn(b, 4, 8, 8, generator=g),
        "text_embeddings": torch.randn(b, 5, 16, generator=g),
    }


def test_step_returns_reference_shapes_and_backpropagates():
    model = EchoModel()
    pipe = FlowMatchingPipeline(SimpleAdapter())
    batch = simple_batch()
    weighted, avg, mask, metrics = pipe.step(model, batch, dtype=torch.float32)
    assert weighted.shape == batch["image_latents"].shape and avg.ndim == 0 and mask is None
    avg.backward()
    assert model.scale.grad is not None and model.scale.grad != 0
    assert metrics["data_type"] == "image" and metrics["task_type"] == "t2v"
    assert 0.0 <= metrics["sigma_min"] <= metrics["sigma_max"] <= 1.0
    assert metrics["loss"] == pytest.approx(avg.item())


def test_step_device_none_uses_latents_device():
    pipe = FlowMatchingPipeline(SimpleAdapter())  # the reference would default to CUDA
    weighted, *_ = pipe.step(EchoModel(), simple_batch(), dtype=torch.float32)
    assert weighted.device == torch.device("cpu")


def test_step_target_is_noise_minus_data(monkeypatch):
    """With sigma fixed, a model predicting exactly noise - x0 has zero loss."""
    pipe = FlowMatchingPipeline(SimpleAdapter(), cfg_dropout_prob=0.0)
    batch = simple_batch(b=2)
    monkeypatch.setattr(
        pipe,
        "sample_timesteps",
        lambda b, d, generator=None: (torch.full((b,), 0.3), torch.full((b,), 300.0), "fixed"),
    )
    noise = torch.randn(batch["image_latents"].shape, generator=torch.Generator().manual_seed(7))

    class Oracle(nn.Module):
        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=True):
            x0 = batch["image_latents"]
            assert torch.allclose(hidden_states, 0.7 * x0 + 0.3 * noise, atol=1e-6)
            assert torch.allclose(timestep, torch.full((2,), 300.0))
            return (noise - x0,)

    _, avg, _, _ = pipe.step(Oracle(), batch, dtype=torch.float32, generator=torch.Generator().manual_seed(7))
    assert avg.item() == pytest.approx(0.0, abs=1e-10)


def test_per_sample_generators_make_samples_independent_of_batch_split():
    """Sample i's sigma, noise and dropout come only from generator i (multi-GPU equivalence)."""
    pipe = FlowMatchingPipeline(SimpleAdapter(), cfg_dropout_prob=0.5)
    batch = simple_batch(b=4)

    def gens(ids):
        return [torch.Generator().manual_seed(1000 + i) for i in ids]

    whole, *_ = pipe.step(
        EchoModel(), batch, dtype=torch.float32, generator=gens(range(4)), collect_metrics=False
    )
    halves = [
        pipe.step(
            EchoModel(),
            {k: v[s] for k, v in batch.items()},
            dtype=torch.float32,
            generator=gens(range(4)[s]),
            collect_metrics=False,
        )[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert torch.equal(whole, torch.cat(halves))


def test_cfg_dropout_is_per_sample_and_consistent_across_conditionings():
    pipe = FlowMatchingPipeline(FluxAdapter(), cfg_dropout_prob=0.5)
    model = EchoModel(guidance_embeds=True)
    b = 64
    batch = {
        "image_latents": torch.randn(b, 4, 4, 4),
        "text_embeddings": torch.ones(b, 3, 8),
        "pooled_prompt_embeds": torch.ones(b, 6),
    }
    _, _, _, metrics = pipe.step(
        model, batch, dtype=torch.float32, generator=torch.Generator().manual_seed(3)
    )
    call = model.calls[-1]
    text_dropped = call["encoder_hidden_states"].abs().sum(dim=(1, 2)) == 0
    pooled_dropped = call["pooled_projections"].abs().sum(dim=1) == 0
    assert torch.equal(text_dropped, pooled_dropped)
    assert 0 < text_dropped.sum().item() < b  # per sample, not all-or-nothing per batch
    assert metrics["cfg_dropped"] == text_dropped.sum().item()
    # kept samples are untouched
    assert torch.equal(
        call["encoder_hidden_states"][~text_dropped], torch.ones(int((~text_dropped).sum()), 3, 8)
    )


@pytest.mark.parametrize("prob,expected", [(0.0, 0), (1.0, 8)])
def test_cfg_dropout_extremes(prob, expected):
    pipe = FlowMatchingPipeline(SimpleAdapter(), cfg_dropout_prob=prob)
    model = EchoModel()
    pipe.step(model, simple_batch(b=8), dtype=torch.float32)
    dropped = (model.calls[-1]["encoder_hidden_states"].abs().sum(dim=(1, 2)) == 0).sum().item()
    assert dropped == expected


class ConstantModel(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, hidden_states, return_dict=True, **kwargs):
        return (torch.full_like(hidden_states, self.value) + self.p,)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e4])
def test_loss_explosion_check(value):
    pipe = FlowMatchingPipeline(SimpleAdapter())
    with pytest.raises(LossExplosionError, match="step 12"):
        pipe.step(ConstantModel(value), simple_batch(), dtype=torch.float32, global_step=12)
    pipe.step(
        ConstantModel(value), simple_batch(), dtype=torch.float32, check_loss=False, collect_metrics=False
    )


@pytest.mark.parametrize("method", ["mix", "logit_normal", "beta"])
def test_hot_path_makes_no_host_sync(monkeypatch, method):
    """collect_metrics=False and check_loss=False: no tensor is read back to the host (uniform
    mixing included: it is decided per sample on the device)."""
    pipe = FlowMatchingPipeline(SimpleAdapter(), timestep_sampling=method, mix_uniform_ratio=0.5)

    def forbidden(*args, **kwargs):
        raise AssertionError("host-device sync on the hot path")

    batch = simple_batch()
    for name in ("item", "__bool__", "__float__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    _, avg, _, metrics = pipe.step(
        EchoModel(), batch, dtype=torch.float32, collect_metrics=False, check_loss=False
    )
    monkeypatch.undo()
    assert metrics == {} and avg.ndim == 0
    with pytest.raises(AssertionError, match="host-device sync"):
        for name in ("item", "__bool__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, forbidden)
        pipe.step(EchoModel(), batch, dtype=torch.float32, collect_metrics=True, check_loss=False)


def test_step_rejects_batch_without_latents():
    with pytest.raises(KeyError, match="image_latents"):
        FlowMatchingPipeline(SimpleAdapter()).step(EchoModel(), {"text_embeddings": torch.zeros(1, 2, 3)})


def test_determine_task_type():
    pipe = FlowMatchingPipeline(SimpleAdapter(), i2v_prob=1.0)
    assert pipe.determine_task_type("image") == "t2v"
    assert pipe.determine_task_type("video") == "i2v"
    assert FlowMatchingPipeline(SimpleAdapter(), i2v_prob=0.0).determine_task_type("video") == "t2v"


class ContextRecorder(SimpleAdapter):
    """SimpleAdapter that keeps the contexts it is given."""

    def __init__(self):
        self.contexts: list[FlowMatchingContext] = []

    def prepare_inputs(self, context):
        self.contexts.append(context)
        return super().prepare_inputs(context)


def test_i2v_is_decided_per_sample_from_the_per_sample_generators(monkeypatch):
    import random

    def forbidden(*args, **kwargs):
        raise AssertionError("Python's random module used")

    monkeypatch.setattr(random, "random", forbidden)
    adapter = ContextRecorder()
    pipe = FlowMatchingPipeline(adapter, i2v_prob=0.5)
    batch = {"video_latents": torch.randn(16, 4, 2, 2, 2), "text_embeddings": torch.randn(16, 3, 8)}

    def gens(ids):
        return [torch.Generator().manual_seed(300 + i) for i in ids]

    pipe.step(EchoModel(), batch, dtype=torch.float32, generator=gens(range(16)))
    whole = adapter.contexts[-1].i2v_mask
    assert whole.shape == (16,) and whole.dtype == torch.bool
    assert 0 < whole.sum().item() < 16  # per sample, not one decision for the batch
    assert adapter.contexts[-1].task_type == "i2v"  # "i2v" when any sample is
    halves = []
    for s in (slice(0, 8), slice(8, 16)):
        pipe.step(
            EchoModel(),
            {k: v[s] for k, v in batch.items()},
            dtype=torch.float32,
            generator=gens(range(16)[s]),
        )
        halves.append(adapter.contexts[-1].i2v_mask)
    assert torch.equal(whole, torch.cat(halves))
    # images never draw: their task is always t2v
    pipe.step(EchoModel(), simple_batch(), dtype=torch.float32, generator=gens(range(4)))
    assert adapter.contexts[-1].task_type == "t2v" and adapter.contexts[-1].i2v_mask is None
    # the reference's one-decision API draws from the generator it is given
    one = [pipe.determine_task_type("video", generator=torch.Generator().manual_seed(i)) for i in range(40)]
    again = [pipe.determine_task_type("video", generator=torch.Generator().manual_seed(i)) for i in range(40)]
    assert one == again and set(one) == {"i2v", "t2v"}


def test_errors_callers_of_the_reference_match():
    with pytest.raises(ValueError, match="Unknown adapter type"):
        create_adapter("sd15")
    for error in (TypeError, ValueError):  # the reference raises the constructor's TypeError
        with pytest.raises(error, match="bad arguments"):
            create_adapter("flux", guidance=3.0)
    with pytest.raises(ValueError, match="Unknown loss_weighting_scheme"):
        FlowMatchingPipeline(SimpleAdapter(), loss_weighting_scheme="cubic")
    with pytest.raises(KeyError, match="video_latents.*image_latents"):
        FlowMatchingPipeline(SimpleAdapter()).step(EchoModel(), {"text_embeddings": torch.zeros(1, 2, 3)})
    with pytest.raises(ValueError, match="Loss exploded"):
        FlowMatchingPipeline(SimpleAdapter()).step(ConstantModel(1e4), simple_batch(), dtype=torch.float32)


def test_video_latents_with_simple_adapter():
    pipe = FlowMatchingPipeline(SimpleAdapter())
    batch = {"video_latents": torch.randn(2, 4, 3, 4, 4), "text_embeddings": torch.randn(2, 5, 8)}
    weighted, _, _, metrics = pipe.step(EchoModel(), batch, dtype=torch.float32)
    assert weighted.shape == (2, 4, 3, 4, 4) and metrics["data_type"] == "video"


# ---------------------------------------------------------------- factories


def test_create_adapter_and_pipeline():
    adapter = create_adapter("flux", guidance_scale=1.0, use_guidance_embeds=False)
    assert isinstance(adapter, FluxAdapter) and adapter.guidance_scale == 1.0
    assert isinstance(create_adapter("simple"), SimpleAdapter)
    pipe = create_pipeline("flux", {"guidance_scale": 2.0}, flow_shift=1.5, timestep_sampling="mode")
    assert pipe.flow_shift == 1.5 and pipe.model_adapter.guidance_scale == 2.0
    assert isinstance(create_adapter("flux_kontext"), FluxKontextAdapter)
    available = ", ".join([*(spec.adapter for spec in FAMILIES.values()), "simple"])
    with pytest.raises(ValueError, match=f"available: {available}$"):
        create_adapter("sd15")
    with pytest.raises(ValueError, match="bad arguments"):
        create_adapter("flux", guidance=3.0)


# ---------------------------------------------------------------- FLUX.1 adapter


@pytest.mark.parametrize("b,c,h,w", [(1, 16, 8, 8), (2, 16, 6, 10), (3, 4, 2, 4)])
def test_flux_packing_matches_diffusers(b, c, h, w):
    adapter = FluxAdapter()
    latents = torch.randn(b, c, h, w)
    packed = adapter._pack_latents(latents)
    assert packed.shape == (b, (h // 2) * (w // 2), c * 4)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, b, c, h, w))
    unpacked = FluxAdapter._unpack_latents(packed, h * 8, w * 8, vae_scale_factor=8)
    assert torch.equal(unpacked, FluxPipeline._unpack_latents(packed, h * 8, w * 8, 8))
    assert torch.equal(unpacked, latents)


@pytest.mark.parametrize("h,w", [(8, 8), (6, 10)])
def test_flux_image_ids_match_diffusers(h, w):
    ids = FluxAdapter()._prepare_latent_image_ids(3, h, w, torch.device("cpu"), torch.float32)
    assert ids.shape == (3, (h // 2) * (w // 2), 3)
    reference = FluxPipeline._prepare_latent_image_ids(3, h // 2, w // 2, torch.device("cpu"), torch.float32)
    for row in ids:
        assert torch.equal(row, reference)


def flux_context(b=2, h=4, w=6, dropout_mask=None) -> FlowMatchingContext:
    latents = torch.randn(b, 16, h, w)
    return FlowMatchingContext(
        noisy_latents=latents,
        latents=latents,
        timesteps=torch.full((b,), 250.0),
        sigma=torch.full((b,), 0.25),
        task_type="t2v",
        data_type="image",
        device=torch.device("cpu"),
        dtype=torch.float32,
        batch={"text_embeddings": torch.randn(b, 7, 32), "pooled_prompt_embeds": torch.randn(b, 24)},
        cfg_dropout_mask=dropout_mask,
    )


def test_flux_prepare_inputs_shapes():
    inputs = FluxAdapter(guidance_scale=4.0).prepare_inputs(flux_context())
    assert inputs["hidden_states"].shape == (2, 6, 64)
    assert inputs["encoder_hidden_states"].shape == (2, 7, 32)
    assert inputs["pooled_projections"].shape == (2, 24)
    assert torch.equal(inputs["timestep"], torch.full((2,), 0.25))
    assert inputs["img_ids"].shape == (6, 3) and torch.equal(inputs["txt_ids"], torch.zeros(7, 3))
    assert torch.equal(inputs["guidance"], torch.full((2,), 4.0))


def test_flux_guidance_is_passed_only_to_guidance_models():
    ctx = flux_context()
    adapter = FluxAdapter(guidance_scale=4.0)
    for has_guidance in (True, False):
        model = EchoModel(guidance_embeds=has_guidance)
        pred = adapter.forward(model, adapter.prepare_inputs(ctx))
        assert pred.shape == ctx.noisy_latents.shape
        passed = model.calls[-1]["guidance"]
        assert (passed is not None) == has_guidance
    with pytest.raises(ValueError, match="use_guidance_embeds"):
        no_guidance = FluxAdapter(use_guidance_embeds=False)
        no_guidance.forward(EchoModel(guidance_embeds=True), no_guidance.prepare_inputs(ctx))
    schnell_style = FluxAdapter(use_guidance_embeds=False)
    model = EchoModel(guidance_embeds=False)
    schnell_style.forward(model, schnell_style.prepare_inputs(ctx))
    assert model.calls[-1]["guidance"] is None


def test_flux_adapter_rejects_video_latents():
    ctx = flux_context()
    ctx.noisy_latents = torch.randn(2, 16, 1, 4, 6)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        FluxAdapter().prepare_inputs(ctx)
    with pytest.raises(ValueError, match="FluxAdapter expects 4D latents .*got 5D"):
        FluxAdapter().prepare_inputs(ctx)


def test_flux_takes_clip_pooled_as_well_as_pooled_prompt_embeds():
    ctx = flux_context()
    pooled = ctx.batch.pop("pooled_prompt_embeds")
    ctx.batch["clip_pooled"] = pooled
    assert torch.equal(FluxAdapter().prepare_inputs(ctx)["pooled_projections"], pooled)
    ctx.batch["pooled_prompt_embeds"] = pooled + 1  # both: pooled_prompt_embeds wins, as in the reference
    assert torch.equal(FluxAdapter().prepare_inputs(ctx)["pooled_projections"], pooled + 1)


def test_flux_without_a_pooled_embedding_gets_zeros_of_the_model_s_width():
    ctx = flux_context()
    del ctx.batch["pooled_prompt_embeds"]
    adapter = FluxAdapter()
    inputs = adapter.prepare_inputs(ctx)
    assert torch.equal(inputs["pooled_projections"], torch.zeros(2, 768))  # the reference's CLIP-L width
    model = EchoModel(guidance_embeds=True)
    model.config.pooled_projection_dim = 24
    adapter.forward(model, inputs)
    assert torch.equal(model.calls[-1]["pooled_projections"], torch.zeros(2, 24))


def test_flux_takes_unbatched_text_and_pooled_embeddings_for_one_sample():
    ctx = flux_context(b=1)
    ctx.batch = {"text_embeddings": torch.randn(7, 32), "pooled_prompt_embeds": torch.randn(24)}
    inputs = FluxAdapter().prepare_inputs(ctx)
    assert torch.equal(inputs["encoder_hidden_states"], ctx.batch["text_embeddings"][None])
    assert torch.equal(inputs["pooled_projections"], ctx.batch["pooled_prompt_embeds"][None])
    two = flux_context(b=2)
    two.batch["text_embeddings"] = torch.randn(7, 32)
    with pytest.raises(ValueError, match="text_embeddings.*2 samples"):
        FluxAdapter().prepare_inputs(two)


def test_adapters_called_directly_honour_the_context_s_cfg_dropout_prob():
    ctx = flux_context(b=64)
    ctx.cfg_dropout_prob = 0.5
    torch.manual_seed(0)
    inputs = FluxAdapter().prepare_inputs(ctx)
    text_dropped = inputs["encoder_hidden_states"].abs().sum(dim=(1, 2)) == 0
    pooled_dropped = inputs["pooled_projections"].abs().sum(dim=1) == 0
    assert torch.equal(text_dropped, pooled_dropped) and 0 < text_dropped.sum().item() < 64
    ctx.cfg_dropout_prob = 1.0
    inputs = FluxAdapter().prepare_inputs(ctx)
    assert inputs["encoder_hidden_states"].abs().sum() == 0 and inputs["pooled_projections"].abs().sum() == 0
    assert ctx.cfg_dropout_mask is None  # the caller's context is left as it was
    # the pipeline's per-sample mask wins over the probability
    ctx.cfg_dropout_mask = torch.zeros(64, dtype=torch.bool)
    inputs = FluxAdapter().prepare_inputs(ctx)
    assert torch.equal(inputs["encoder_hidden_states"], ctx.batch["text_embeddings"])
    simple = flux_context(b=3)
    simple.cfg_dropout_prob = 1.0
    assert SimpleAdapter().prepare_inputs(simple)["encoder_hidden_states"].abs().sum() == 0


def seeded_tiny_transformer(guidance_embeds: bool = True) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return tiny_flux_transformer(guidance_embeds).train()


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_step_with_real_flux_transformer_backpropagates(guidance_embeds):
    model = seeded_tiny_transformer(guidance_embeds)
    pipe = create_pipeline("flux", flow_shift=3.0, cfg_dropout_prob=0.5)
    batch = {
        "image_latents": torch.randn(2, 16, 8, 8),
        "text_embeddings": torch.randn(2, 10, 32),
        "pooled_prompt_embeds": torch.randn(2, 32),
    }
    weighted, avg, _, metrics = pipe.step(
        model, batch, dtype=torch.float32, generator=torch.Generator().manual_seed(0)
    )
    assert weighted.shape == (2, 16, 8, 8) and torch.isfinite(avg)
    avg.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert model.x_embedder.weight.grad.abs().sum() > 0
    assert metrics["loss"] > 0


def test_step_in_bf16_with_real_flux_transformer():
    model = seeded_tiny_transformer().to(torch.bfloat16)
    pipe = create_pipeline("flux")
    batch = {
        "image_latents": torch.randn(1, 16, 4, 4),
        "text_embeddings": torch.randn(1, 6, 32),
        "pooled_prompt_embeds": torch.randn(1, 32),
    }
    weighted, avg, _, _ = pipe.step(model, batch, dtype=torch.bfloat16)
    assert weighted.dtype == torch.float32 and torch.isfinite(avg)
    avg.backward()


def test_debug_logs_only_when_enabled(caplog):
    pipe = FlowMatchingPipeline(SimpleAdapter(), log_interval=100, summary_log_interval=10)
    with caplog.at_level("INFO", logger="flowtune.flow_matching.pipeline"):
        pipe.step(EchoModel(), simple_batch(), dtype=torch.float32, global_step=0)
    assert caplog.records == []
    with caplog.at_level("DEBUG", logger="flowtune.flow_matching.pipeline"):
        pipe.step(EchoModel(), simple_batch(), dtype=torch.float32, global_step=0)  # detailed
        pipe.step(EchoModel(), simple_batch(), dtype=torch.float32, global_step=10)  # summary
        pipe.step(EchoModel(), simple_batch(), dtype=torch.float32, global_step=11)  # nothing
    text = caplog.text
    assert "[step 0] flow matching" in text and "[step 0] loss" in text and "unweighted" in text
    assert "[step 10] loss" in text and "[step 11]" not in text


# ---------------------------------------------------------------- evaluate (validation loss)


def test_evaluate_is_the_unweighted_velocity_error_at_the_given_sigma_and_noise():
    """x_t = (1 - sigma) x0 + sigma noise; per-sample mean of (model(x_t) - (noise - x0))^2."""
    batch = simple_batch(b=3)
    x0 = batch["image_latents"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.1, 0.5, 0.9])
    model = EchoModel()  # predicts 0.5 * x_t
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    expected = ((0.5 * x_t - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    for settings in ({}, {"flow_shift": 1.0, "loss_weighting_scheme": "bsmntw", "cfg_dropout_prob": 1.0}):
        pipe = FlowMatchingPipeline(SimpleAdapter(), **settings)
        with torch.no_grad():
            got = pipe.evaluate(model, batch, sigma, noise, dtype=torch.float32)
        assert got.shape == (3,)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
        # the text conditioning is never dropped, whatever cfg_dropout_prob says
        assert model.calls[-1]["encoder_hidden_states"].abs().sum(dim=(1, 2)).min() > 0


def test_evaluate_averages_over_the_loss_mask():
    batch = simple_batch(b=2)
    mask = torch.zeros(2, 8, 8)
    mask[:, :4] = 1.0
    batch["loss_mask"] = mask
    x0 = batch["image_latents"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.3, 0.6])
    pipe = FlowMatchingPipeline(SimpleAdapter())
    with torch.no_grad():
        got = pipe.evaluate(EchoModel(), batch, sigma, noise, dtype=torch.float32)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    error = (0.5 * x_t - (noise - x0)) ** 2
    assert torch.allclose(got, error[:, :, :4].mean(dim=(1, 2, 3)), rtol=1e-5)
