"""FlowMatchingPipeline: model-agnostic flow-matching training math (the seed API).

Conventions, stated once:

* sigma = 1 is pure noise, sigma = 0 is data.
* x_t = (1 - sigma) * x_0 + sigma * noise          (:class:`LinearInterpolationSchedule`)
* the model predicts the velocity v = noise - x_0  (the training target)
* timesteps = sigma * num_train_timesteps

Timestep sampling draws u in (0, 1) from a distribution (``timestep_sampling``), replaces it by a
uniform draw with probability ``mix_uniform_ratio``, applies the flow shift
sigma = shift / (shift + (1/u - 1)) and clamps sigma to [sigma_min, sigma_max].  ``beta`` draws
sigma itself (no mixing, no shift), as the reference does.  ``sigma_range`` (a flowtune addition)
instead *samples* sigma within a range: the same distribution restricted to it (conditioned on
landing there), not clamped into it (:meth:`FlowMatchingPipeline.sample_timesteps`).

Where flowtune differs from the reference implementation (all documented in docs/):

* ``device=None`` means the latents' device (the reference defaults to CUDA).
* ``loss_mask`` from the batch is applied, times the adapter's own (``ModelAdapter.loss_mask``:
  elements the model is given clean, such as a condition frame): the averages are masked
  means.
* Classifier-free-guidance dropout is drawn per sample by the pipeline (``cfg_dropout_mask`` in
  the context) and applied by every adapter to all of its text conditioning.
* ``mix_uniform_ratio`` mixes uniform draws into every strategy but ``beta`` per sample, with no
  host sync; the reference switched whole batches to uniform with a host sync per step (the same
  marginal distribution).
* All random draws (sigma, noise, caption dropout, the video i2v choice) can come from per-sample
  generators (``generator=[g_0, ..., g_B-1]``), so a sample's draws do not depend on how a global
  batch is split across processes.  The i2v choice is made per sample (``i2v_mask`` in the
  context), never with Python's ``random``.
* The explosion check raises :class:`LossExplosionError` (a ``ValueError``) for any non-finite
  loss, not only NaN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from flowtune.flow_matching import rng
from flowtune.flow_matching.adapters.base import FlowMatchingContext, ModelAdapter
from flowtune.flow_matching.choices import LOSS_WEIGHTING_SCHEMES, TIMESTEP_SAMPLING_METHODS

logger = logging.getLogger(__name__)

MODE_SCALE = 1.29
"""Scale of the "mode" density (SD3's default), u -> 1 - u - s * (cos(pi u / 2)^2 - 1 + u)."""


class LossExplosionError(ValueError):
    """The average loss of a step was non-finite or above the explosion threshold."""


class AdapterArgumentsError(ValueError, TypeError):
    """:func:`create_adapter` got keyword arguments its adapter does not take (a ``ValueError``
    for flowtune's callers, and the constructor's ``TypeError`` for the reference's)."""


class LinearInterpolationSchedule:
    """Linear interpolation between data and noise: x_t = (1 - sigma) * x_0 + sigma * x_1."""

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Interpolate per sample.

        Args:
            x0: Clean latents [B, ...].
            x1: Noise, same shape.
            sigma: [B] values in [0, 1].

        Returns:
            x_t, same shape as ``x0``.
        """
        sigma = sigma.view(-1, *([1] * (x0.ndim - 1)))
        return (1.0 - sigma) * x0 + sigma * x1


class FlowMatchingPipeline:
    """Model-agnostic flow-matching training step; model specifics live in ``model_adapter``.

    Args:
        model_adapter: The family's :class:`ModelAdapter`.
        num_train_timesteps: Timesteps are sigma * num_train_timesteps.
        timestep_sampling: Distribution of u, one of :data:`TIMESTEP_SAMPLING_METHODS`.
        flow_shift: Shift s of sigma = s / (s + (1/u - 1)); s > 1 favours noisier sigmas.
        i2v_prob: For video batches, probability of the image-to-video task.
        cfg_dropout_prob: Per-sample probability of dropping the text conditioning.
        logit_mean, logit_std: Normal parameters of ``logit_normal`` (u = sigmoid(N(mean, std))).
        mix_uniform_ratio: Per-sample probability of a uniform u instead of one from
            ``timestep_sampling``'s distribution (every strategy but ``beta``; ``mix`` is
            ``lognorm`` with this mixing).
        beta_alpha, beta_beta: Positive shape parameters of ``beta`` sampling, which draws
            sigma ~ Beta(beta_alpha, beta_beta) directly: no flow shift, no uniform mixing.
        use_sigma_noise: If False, sigma is drawn uniformly with no shift ("uniform_no_shift").
        sigma_min, sigma_max: Clamp range of sigma (fine-tuning may restrict it).
        sigma_range: ``(low, high)``, 0 <= low < high <= 1: draw sigma from the configured
            distribution restricted to [low, high] (what a model that denoises only part of the
            noise range trains on, e.g. one expert of a two-expert pipeline); None = the whole
            range.  Unlike the clamp, no probability piles up at the ends.  Every method but
            ``beta`` (see :meth:`_restricted_components`).
        use_loss_weighting: Weight the per-element loss by sigma.
        loss_weighting_scheme: ``linear``: w = 1 + flow_shift * sigma; ``bsmntw``: the bell-shaped
            midpoint table of :meth:`_build_bsmntw_weights` indexed by timestep.
        log_interval: Steps between detailed debug logs (logger level DEBUG only).
        summary_log_interval: Steps between one-line debug summaries (logger level DEBUG only).
        device: Device for timestep sampling when a call gives none; ``None`` = the latents'
            device.
    """

    loss_explosion_threshold: float = 100.0
    """:meth:`step` with ``check_loss`` raises when the average loss exceeds this."""

    def __init__(
        self,
        model_adapter: ModelAdapter,
        num_train_timesteps: int = 1000,
        timestep_sampling: str = "logit_normal",
        flow_shift: float = 3.0,
        i2v_prob: float = 0.3,
        cfg_dropout_prob: float = 0.1,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mix_uniform_ratio: float = 0.1,
        beta_alpha: float = 2.5,
        beta_beta: float = 1.5,
        use_sigma_noise: bool = True,
        sigma_min: float = 0.0,
        sigma_max: float = 1.0,
        sigma_range: tuple[float, float] | None = None,
        use_loss_weighting: bool = True,
        loss_weighting_scheme: str = "linear",
        log_interval: int = 100,
        summary_log_interval: int = 10,
        device: torch.device | str | None = None,
    ):
        if timestep_sampling not in TIMESTEP_SAMPLING_METHODS:
            raise ValueError(
                f"Unknown timestep_sampling {timestep_sampling!r}; allowed: {', '.join(TIMESTEP_SAMPLING_METHODS)}"
            )
        if loss_weighting_scheme not in LOSS_WEIGHTING_SCHEMES:
            raise ValueError(
                f"Unknown loss_weighting_scheme {loss_weighting_scheme!r}; "
                f"allowed: {', '.join(LOSS_WEIGHTING_SCHEMES)}"
            )
        if not all(math.isfinite(v) and v > 0 for v in (beta_alpha, beta_beta)):
            raise ValueError(
                f"beta_alpha and beta_beta must both be positive, got {beta_alpha} and {beta_beta}"
            )
        if not 0.0 <= sigma_min <= sigma_max <= 1.0:
            raise ValueError(f"need 0 <= sigma_min <= sigma_max <= 1, got {sigma_min} and {sigma_max}")
        if sigma_range is not None:
            low, high = (float(v) for v in sigma_range)
            if not 0.0 <= low < high <= 1.0:
                raise ValueError(f"need 0 <= low < high <= 1 for sigma_range, got {low} and {high}")
            if timestep_sampling == "beta" and use_sigma_noise:
                raise ValueError("sigma_range cannot restrict beta timestep sampling; use another method")
            sigma_range = (low, high)
        self.model_adapter = model_adapter
        self.num_train_timesteps = num_train_timesteps
        self.timestep_sampling = timestep_sampling
        self.flow_shift = flow_shift
        self.i2v_prob = i2v_prob
        # The adapter's loss mask of the last predict() (ModelAdapter.loss_mask), for its loss.
        self._adapter_loss_mask: torch.Tensor | None = None
        self.cfg_dropout_prob = cfg_dropout_prob
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mix_uniform_ratio = mix_uniform_ratio
        self.beta_alpha = float(beta_alpha)
        self.beta_beta = float(beta_beta)
        self.use_sigma_noise = use_sigma_noise
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_range = sigma_range
        self.use_loss_weighting = use_loss_weighting
        self.loss_weighting_scheme = loss_weighting_scheme
        self.log_interval = log_interval
        self.summary_log_interval = summary_log_interval
        self.device = torch.device(device) if device is not None else None
        self.noise_schedule = LinearInterpolationSchedule()
        self._bsmntw_weights = self._build_bsmntw_weights() if loss_weighting_scheme == "bsmntw" else None
        self._restricted = self._restrict(*sigma_range) if sigma_range is not None else None

    # ------------------------------------------------------------------ timesteps

    def _build_bsmntw_weights(self) -> torch.Tensor:
        """Bell-Shaped Midpoint Noise Timestep Weighting table.

        w[t] = exp(-2 ((t - T/2) / T)^2), shifted so its minimum is 0 and scaled so that the
        table sums to T (mean weight 1).

        Returns:
            [num_train_timesteps] float32.
        """
        steps = self.num_train_timesteps
        t = torch.arange(steps, dtype=torch.float32)
        w = torch.exp(-2.0 * ((t - steps / 2) / steps) ** 2)
        w = w - w.min()
        return w * (steps / w.sum())

    def _sample_from_distribution(
        self, batch_size: int, device: torch.device | str, generator: rng.Generators = None
    ) -> torch.Tensor:
        """Draw u in [0, 1] from the configured distribution (before uniform mixing).

        * uniform: U(0, 1)
        * logit_normal: sigmoid(N(logit_mean, logit_std))
        * lognorm and mix: sigmoid(N(0, 1)) (``mix`` is lognorm; :meth:`sample_timesteps` mixes
          uniform draws into every strategy at ``mix_uniform_ratio``)
        * mode: 1 - v - 1.29 (cos(pi v / 2)^2 - 1 + v), v ~ U(0, 1)
        * beta: Beta(beta_alpha, beta_beta) (used as sigma directly, without the shift)

        Returns:
            [batch_size] float32 on ``device``.
        """
        method = self.timestep_sampling
        if method == "beta":
            return self._beta(batch_size, generator, device)
        if method in ("lognorm", "mix"):
            return self._density("logit_normal", batch_size, 0.0, 1.0, generator, device)
        if method == "mode":
            return self._density("mode", batch_size, 0.0, 1.0, generator, device).clamp(0.0, 1.0)
        if method == "logit_normal":
            return self._density(
                "logit_normal", batch_size, self.logit_mean, self.logit_std, generator, device
            )
        return rng.rand(batch_size, generator, device)

    @staticmethod
    def _density(
        scheme: str,
        batch_size: int,
        mean: float,
        std: float,
        generator: rng.Generators,
        device: torch.device | str,
    ) -> torch.Tensor:
        """One draw per sample from diffusers' SD3 density sampler, per-sample generators allowed."""
        # Imported here: diffusers.training_utils takes seconds to import, and recipe validation
        # (which imports this module for its constants) should stay fast.
        from diffusers.training_utils import compute_density_for_timestep_sampling

        if generator is None or isinstance(generator, torch.Generator):
            gen_device = generator.device if generator is not None else device
            u = compute_density_for_timestep_sampling(
                scheme, batch_size, mean, std, MODE_SCALE, device=gen_device, generator=generator
            )
            return rng.to_device(u, device)
        if len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} per-sample generators for a batch of {batch_size}")
        draws = [
            compute_density_for_timestep_sampling(
                scheme, 1, mean, std, MODE_SCALE, device=g.device, generator=g
            )
            for g in generator
        ]
        return rng.to_device(torch.cat(draws), device)

    def _beta(self, batch_size: int, generator: rng.Generators, device: torch.device | str) -> torch.Tensor:
        """Beta(beta_alpha, beta_beta) draws, per-sample generators allowed.

        The draw is torch.distributions.Beta's own (the first coordinate of a Dirichlet sample of
        concentration (alpha, beta)), so with ``generator=None`` it is the reference's draw;
        torch.distributions takes no generator, hence the sampler is called directly.
        """
        concentration = torch.tensor([[self.beta_alpha, self.beta_beta]])

        def draw(n: int, g: torch.Generator | None, on: torch.device | str) -> torch.Tensor:
            return torch._sample_dirichlet(concentration.to(on).expand(n, 2), generator=g)[:, 0]

        if generator is None or isinstance(generator, torch.Generator):
            gen_device = generator.device if generator is not None else device
            return rng.to_device(draw(batch_size, generator, gen_device), device)
        if len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} per-sample generators for a batch of {batch_size}")
        return rng.to_device(torch.cat([draw(1, g, g.device) for g in generator]), device)

    # ------------------------------------------------------------------ restricted sampling

    def _shifted(self, u: torch.Tensor) -> torch.Tensor:
        """The flow shift s u / (s u + 1 - u) (= s / (s + 1/u - 1), defined at u = 0)."""
        s = self.flow_shift
        return s * u / (s * u + 1.0 - u)

    def _restricted_components(self) -> list[tuple[float, Any]]:
        """The configured distribution of sigma as a mixture of monotone maps of one uniform draw:
        ``(weight, f)`` pairs, sigma = f(v) with v ~ U(0, 1) and f non-decreasing ([N] float64 ->
        [N] float64), the weights summing to 1.

        * ``use_sigma_noise=False``: f(v) = v.
        * ``uniform``: f(v) = shift(v).
        * ``logit_normal``, ``lognorm``, ``mix``: shift(sigmoid(mean + std * Phi^-1(v))), mixed
          with ``uniform`` at ``mix_uniform_ratio``.
        * ``mode``: shift(clamp(g(1 - v), 0, 1)) with g the decreasing "mode" map of
          :meth:`_sample_from_distribution`, mixed with ``uniform`` likewise.

        These are the distributions :meth:`sample_timesteps` draws from (but for its 1e-5 floor on
        u), written as quantile functions so that a range of sigma is a range of v.
        """
        if not self.use_sigma_noise:
            return [(1.0, lambda v: v)]
        uniform = (1.0, self._shifted)
        method = self.timestep_sampling
        if method == "uniform":
            return [uniform]
        if method == "mode":

            def base(v: torch.Tensor) -> torch.Tensor:
                w = 1.0 - v
                return self._shifted(
                    (1 - w - MODE_SCALE * (torch.cos(math.pi * w / 2) ** 2 - 1 + w)).clamp(0, 1)
                )
        else:
            mean, std = (self.logit_mean, self.logit_std) if method == "logit_normal" else (0.0, 1.0)

            def base(v: torch.Tensor) -> torch.Tensor:
                return self._shifted(torch.sigmoid(mean + std * torch.special.ndtri(v)))

        ratio = self.mix_uniform_ratio
        return [(1.0 - ratio, base), (ratio, self._shifted)] if ratio > 0 else [(1.0, base)]

    def _restrict(self, low: float, high: float) -> list[tuple[float, float, float, Any]]:
        """Each mixture component restricted to sigma in [low, high]: ``(probability, v_low,
        v_high, f)``, the probabilities those of the components *given* sigma in the range (each
        component's weight times its mass in the range, normalised).

        Raises:
            ValueError: the distribution puts no probability on the range.
        """
        parts = []
        for weight, f in self._restricted_components():
            v_low, v_high = _preimage(f, low), _preimage(f, high, upper=True)
            parts.append((weight * max(v_high - v_low, 0.0), v_low, v_high, f))
        mass = sum(p for p, *_ in parts)
        if not mass > 0:
            raise ValueError(
                f"timestep_sampling {self.timestep_sampling!r} puts no probability on sigma in [{low}, {high}]"
            )
        return [(p / mass, v_low, v_high, f) for p, v_low, v_high, f in parts]

    def sigma_mass(self, low: float, high: float) -> float:
        """The probability that the configured distribution (without ``sigma_range`` and the
        clamp) gives sigma in [low, high]."""
        return sum(
            weight * max(_preimage(f, high, upper=True) - _preimage(f, low), 0.0)
            for weight, f in self._restricted_components()
        )

    def _sample_restricted(
        self, batch_size: int, device: torch.device | str, generator: rng.Generators
    ) -> torch.Tensor:
        """sigma [B] float32 from the distribution restricted to ``sigma_range``: per sample a
        component (by its probability given the range), then v uniform on that component's
        [v_low, v_high] and sigma = f(v).  Two uniform draws per sample, whatever the method."""
        low, high = self.sigma_range
        pick = rng.rand(batch_size, generator, device).double()
        v01 = rng.rand(batch_size, generator, device).double()
        sigma = torch.zeros(batch_size, dtype=torch.float64, device=pick.device)
        start = 0.0
        for k, (p, v_low, v_high, f) in enumerate(self._restricted):
            last = k == len(self._restricted) - 1
            chosen = pick >= start if last else (pick >= start) & (pick < start + p)
            sigma = torch.where(chosen, f(v_low + v01 * (v_high - v_low)), sigma)
            start += p
        return sigma.clamp(low, high).float()

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str | None = None, *, generator: rng.Generators = None
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Sample sigma with uniform mixing, the flow shift and clamping.

        u comes from :meth:`_sample_from_distribution`; with ``mix_uniform_ratio`` > 0 each sample
        independently takes a uniform u instead with that probability (decided on the device: no
        host sync).  Then sigma = flow_shift / (flow_shift + (1/u - 1)), clamped to
        [sigma_min, sigma_max] (u is clamped to >= 1e-5 first).  ``beta``: sigma is the Beta draw,
        clamped, with no mixing and no shift.  With ``use_sigma_noise=False``: sigma ~ U(0, 1),
        clamped, no shift.  With ``sigma_range``: sigma from that distribution restricted to the
        range (:meth:`_sample_restricted`), then clamped as above.

        Args:
            batch_size: Number of samples B.
            device: Output device; default the pipeline's ``device``, else CPU.
            generator: ``None``, one generator, or B per-sample generators (see ``rng``).

        Returns:
            sigma [B] float32, timesteps [B] float32 (sigma * num_train_timesteps), and the name
            of the sampling method used (``timestep_sampling``, also when some samples took a
            uniform u).
        """
        device = device if device is not None else (self.device or torch.device("cpu"))
        if self._restricted is not None:
            sigma = self._sample_restricted(batch_size, device, generator).clamp(
                self.sigma_min, self.sigma_max
            )
            method = self.timestep_sampling if self.use_sigma_noise else "uniform_no_shift"
            return sigma, sigma * self.num_train_timesteps, method
        if not self.use_sigma_noise:
            sigma = rng.rand(batch_size, generator, device).clamp(self.sigma_min, self.sigma_max)
            return sigma, sigma * self.num_train_timesteps, "uniform_no_shift"
        u = self._sample_from_distribution(batch_size, device, generator)
        if self.timestep_sampling == "beta":
            sigma = u.clamp(self.sigma_min, self.sigma_max)
            return sigma, sigma * self.num_train_timesteps, "beta"
        if self.timestep_sampling != "uniform" and self.mix_uniform_ratio > 0:
            uniform = rng.rand(batch_size, generator, device)
            pick_uniform = rng.rand(batch_size, generator, device) < self.mix_uniform_ratio
            u = torch.where(pick_uniform, uniform, u)
        u = u.clamp(min=1e-5)
        sigma = self.flow_shift / (self.flow_shift + (1.0 / u - 1.0))
        sigma = sigma.clamp(self.sigma_min, self.sigma_max)
        return sigma, sigma * self.num_train_timesteps, self.timestep_sampling

    def sample_task_types(
        self, data_type: str, batch_size: int, generator: rng.Generators = None
    ) -> tuple[str, torch.Tensor | None]:
        """Decide per sample whether a video is trained image-to-video.

        Images (and any ``data_type`` but "video") are always "t2v" and draw nothing.  For videos
        sample i is "i2v" with probability ``i2v_prob``, from one uniform draw of its own
        generator (``generator=None``: torch's global CPU RNG, seeded by ``torch.manual_seed``).
        Draws are made where the generators live, so with CPU generators (the trainer's) reading
        the result costs no device sync.

        Returns:
            The batch's task type ("i2v" when any sample is i2v, else "t2v") and the [B] bool
            ``i2v_mask`` on the generators' device (None for images).
        """
        if data_type != "video":
            return "t2v", None
        if generator is None:
            where: torch.device | str = "cpu"
        elif isinstance(generator, torch.Generator):
            where = generator.device
        else:
            where = generator[0].device if len(generator) else "cpu"
        i2v_mask = rng.rand(batch_size, generator, where) < self.i2v_prob
        return ("i2v" if bool(i2v_mask.any()) else "t2v"), i2v_mask

    def determine_task_type(self, data_type: str, generator: rng.Generators = None) -> str:
        """The reference's one decision: "t2v" for images; for videos "i2v" with probability
        ``i2v_prob``, else "t2v".  Drawn from ``generator`` (one generator, or per-sample
        generators: "i2v" when any of their draws is) or torch's global RNG, never from Python's
        ``random``; :meth:`step` uses :meth:`sample_task_types` for per-sample decisions."""
        batch_size = len(generator) if isinstance(generator, Sequence) else 1
        return self.sample_task_types(data_type, batch_size, generator)[0]

    # ------------------------------------------------------------------ loss

    def compute_loss(
        self,
        model_pred: torch.Tensor,
        target: torch.Tensor,
        sigma: torch.Tensor,
        batch: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Weighted flow-matching loss.

        Args:
            model_pred: [B, ...] velocity prediction.
            target: [B, ...] target noise - x_0.
            sigma: [B] noise levels of the samples.
            batch: May hold ``loss_mask``: 1 where the loss counts, broadcastable to the loss
                ([B, ...], or [B, H, W] for [B, C, H, W] latents: a missing channel axis is
                inserted at dim 1).

        Returns:
            weighted_loss: [B, ...] per-element weighted loss (mask not applied).
            average_weighted_loss: scalar, mean over the masked elements.
            unweighted_loss: [B, ...] per-element squared error.
            average_unweighted_loss: scalar, mean over the masked elements.
            loss_weight: [B, 1, ...] weights (linear: 1 + flow_shift * sigma; bsmntw: table).
            loss_mask: the batch's mask, or None.
        """
        loss = self.model_adapter.compute_loss(model_pred, target)
        loss_mask = batch.get("loss_mask") if batch is not None else None
        sigma = sigma.to(loss.device, torch.float32)
        if not self.use_loss_weighting:
            loss_weight = torch.ones_like(sigma)
        elif self.loss_weighting_scheme == "bsmntw":
            index = (sigma * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
            loss_weight = self._bsmntw_weights.to(loss.device)[index]
        else:
            loss_weight = 1.0 + self.flow_shift * sigma
        loss_weight = loss_weight.view(-1, *([1] * (loss.ndim - 1)))

        weighted_loss = loss * loss_weight
        if loss_mask is None:
            return weighted_loss, weighted_loss.mean(), loss, loss.mean(), loss_weight, None
        mask = loss_mask.to(loss.device, torch.float32)
        if mask.ndim == loss.ndim - 1:
            mask = mask.unsqueeze(1)
        mask = mask.expand_as(loss)
        count = mask.sum().clamp(min=1.0)
        return (
            weighted_loss,
            (weighted_loss * mask).sum() / count,
            loss,
            (loss * mask).sum() / count,
            loss_weight,
            loss_mask,
        )

    # ------------------------------------------------------------------ step

    def _batch_latents(
        self, batch: dict[str, Any], device: torch.device | str | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.device]:
        """The batch's clean latents on the compute device in ``dtype``, and that device."""
        if "video_latents" in batch:
            latents = batch["video_latents"]
        elif "image_latents" in batch:
            latents = batch["image_latents"]
        else:
            raise KeyError("Batch must contain either 'video_latents' or 'image_latents'")
        device = torch.device(device) if device is not None else (self.device or latents.device)
        return latents.to(device, dtype=dtype, non_blocking=True), device

    def predict(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        latents: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        cfg_dropout_mask: torch.Tensor | None = None,
        task_type: str = "t2v",
        i2v_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's velocity prediction at given noise levels and noise (no randomness here).

        Args:
            model: The denoiser.
            batch: The batch (the adapter's conditioning).
            latents: Clean latents x_0, [B, C, H, W] or [B, C, F, H, W], on the compute device.
            noise: Noise of the same shape (float32).
            sigma: [B] noise levels.
            timesteps: [B] ``sigma * num_train_timesteps`` (computed when None).
            dtype: Compute dtype of the model inputs.
            cfg_dropout_mask: [B] bool, True where the text conditioning is dropped; None = none.
            task_type: "t2v", or "i2v" for a video conditioned on its first frame.
            i2v_mask: [B] bool, True for the samples trained image-to-video; None = none.

        Returns:
            model_pred [B, ...] (float32 or the model's dtype), target = noise - x_0 [B, ...]
            float32, and x_t [B, ...] float32.
        """
        if timesteps is None:
            timesteps = sigma * self.num_train_timesteps
        noisy_latents = self.noise_schedule.forward(latents.float(), noise, sigma)
        context = FlowMatchingContext(
            noisy_latents=noisy_latents.to(dtype),
            latents=latents,
            timesteps=timesteps,
            sigma=sigma,
            task_type=task_type,
            data_type=_data_type(batch, latents),
            device=latents.device,
            dtype=dtype,
            batch=batch,
            cfg_dropout_prob=self.cfg_dropout_prob if cfg_dropout_mask is not None else 0.0,
            cfg_dropout_mask=cfg_dropout_mask,
            i2v_mask=i2v_mask.to(latents.device) if i2v_mask is not None else None,
        )
        inputs = self.model_adapter.prepare_inputs(context)
        model_pred = self.model_adapter.forward(model, inputs)
        self._adapter_loss_mask = self.model_adapter.loss_mask(context)
        return model_pred, noise - latents.float(), noisy_latents

    def _masked_batch(self, batch: dict[str, Any], ndim: int) -> dict[str, Any]:
        """``batch`` with the adapter's :meth:`~ModelAdapter.loss_mask` of the last
        :meth:`predict` multiplied into its ``loss_mask`` (latents of rank ``ndim``); unchanged
        when the adapter gave none."""
        adapter_mask = self._adapter_loss_mask
        if adapter_mask is None:
            return batch
        mask = batch.get("loss_mask")
        if mask is not None:
            mask = mask.to(adapter_mask.device, torch.float32)
            adapter_mask = adapter_mask * (mask.unsqueeze(1) if mask.ndim == ndim - 1 else mask)
        return {**batch, "loss_mask": adapter_mask}

    def evaluate(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        sigma: torch.Tensor,
        noise: torch.Tensor,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """Unweighted flow-matching loss at fixed noise levels and noise, for validation.

        No caption dropout and no loss weighting, so the value depends only on the model and the
        data (not on ``flow.*`` training settings) and is comparable across runs.  Call it under
        ``torch.no_grad()``.

        Args:
            sigma: [B] noise levels.
            noise: Noise shaped like the batch's latents ([B, C, H, W] or [B, C, F, H, W]).

        Returns:
            [B] float32: each sample's mean squared error of the velocity (over its
            ``loss_mask`` when the batch has one).
        """
        latents, device = self._batch_latents(batch, device, dtype)
        sigma = sigma.to(device, torch.float32)
        model_pred, target, _ = self.predict(
            model, batch, latents, noise.to(device, torch.float32), sigma, dtype=dtype
        )
        loss = self.model_adapter.compute_loss(model_pred, target).float()
        loss_mask = self._masked_batch(batch, loss.ndim).get("loss_mask")
        if loss_mask is None:
            return loss.flatten(1).mean(dim=1)
        mask = loss_mask.to(loss.device, torch.float32)
        if mask.ndim == loss.ndim - 1:
            mask = mask.unsqueeze(1)
        mask = mask.expand_as(loss).flatten(1)
        return (loss.flatten(1) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def step(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        global_step: int = 0,
        collect_metrics: bool = True,
        check_loss: bool = True,
        *,
        generator: rng.Generators = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """One flow-matching forward pass and loss (the caller runs backward and the optimizer).

        Args:
            model: The denoiser (possibly LoRA-wrapped, DDP-wrapped).
            batch: ``image_latents`` [B, C, H, W] or ``video_latents`` [B, C, F, H, W], plus the
                adapter's conditioning (e.g. ``text_embeddings`` [B, L, D]); optional
                ``data_type`` ("image"/"video", default from the latents' rank) and ``loss_mask``.
            device: Compute device; ``None`` = the pipeline's device, else the latents' device.
            dtype: Compute dtype of the model inputs.
            global_step: Current step, for the debug logs.
            collect_metrics: Return scalar diagnostics (each costs a host-device sync; turn off on
                the hot path).
            check_loss: Raise :class:`LossExplosionError` on a non-finite or exploding loss (one
                host-device sync; turn off on the hot path).
            generator: ``None``, one generator, or B per-sample generators for sigma, noise,
                CFG dropout and (videos) the i2v choice.

        Returns:
            weighted_loss [B, ...], average_weighted_loss (scalar, differentiable), loss_mask
            (or None), metrics (empty unless ``collect_metrics``).
        """
        latents, device = self._batch_latents(batch, device, dtype)
        batch_size = latents.shape[0]
        data_type = _data_type(batch, latents)
        sigma, timesteps, sampling_method = self.sample_timesteps(batch_size, device, generator=generator)
        noise = rng.randn(latents.shape, generator, device)
        cfg_dropout_mask = None
        if self.cfg_dropout_prob > 0:
            cfg_dropout_mask = rng.rand(batch_size, generator, device) < self.cfg_dropout_prob
        # Drawn last, so that adding it left each sample's sigma, noise and dropout draws as they were.
        task_type, i2v_mask = self.sample_task_types(data_type, batch_size, generator)

        debug = logger.isEnabledFor(logging.DEBUG)
        detailed_log = debug and global_step % self.log_interval == 0
        summary_log = debug and not detailed_log and global_step % self.summary_log_interval == 0
        model_pred, target, noisy_latents = self.predict(
            model,
            batch,
            latents,
            noise,
            sigma,
            timesteps,
            dtype=dtype,
            cfg_dropout_mask=cfg_dropout_mask,
            task_type=task_type,
            i2v_mask=i2v_mask,
        )
        if detailed_log:
            self._log_detailed(
                global_step, sampling_method, batch_size, sigma, timesteps, latents, noise, noisy_latents
            )

        (
            weighted_loss,
            average_weighted_loss,
            unweighted_loss,
            average_unweighted_loss,
            loss_weight,
            loss_mask,
        ) = self.compute_loss(model_pred, target, sigma, self._masked_batch(batch, model_pred.ndim))

        if check_loss:
            value = average_weighted_loss.detach()
            if not bool(torch.isfinite(value)) or float(value) > self.loss_explosion_threshold:
                raise LossExplosionError(f"Loss exploded at step {global_step}: {float(value):.4g}")

        if detailed_log:
            self._log_loss_detailed(
                global_step, model_pred, target, loss_weight, average_unweighted_loss, average_weighted_loss
            )
        elif summary_log:
            logger.debug(
                "[step %d] loss %.6f | sigma [%.3f, %.3f] | %s",
                global_step,
                float(average_weighted_loss.detach()),
                float(sigma.min()),
                float(sigma.max()),
                sampling_method,
            )

        metrics: dict[str, Any] = {}
        if collect_metrics:
            metrics = {
                "loss": average_weighted_loss.item(),
                "unweighted_loss": average_unweighted_loss.item(),
                "sigma_min": sigma.min().item(),
                "sigma_max": sigma.max().item(),
                "sigma_mean": sigma.mean().item(),
                "weight_min": loss_weight.min().item(),
                "weight_max": loss_weight.max().item(),
                "timestep_min": timesteps.min().item(),
                "timestep_max": timesteps.max().item(),
                "noisy_min": noisy_latents.min().item(),
                "noisy_max": noisy_latents.max().item(),
                "cfg_dropped": int(cfg_dropout_mask.sum()) if cfg_dropout_mask is not None else 0,
                "sampling_method": sampling_method,
                "task_type": task_type,
                "data_type": data_type,
            }
        return weighted_loss, average_weighted_loss, loss_mask, metrics

    # ------------------------------------------------------------------ debug logging

    def _log_detailed(
        self,
        global_step: int,
        sampling_method: str,
        batch_size: int,
        sigma: torch.Tensor,
        timesteps: torch.Tensor,
        latents: torch.Tensor,
        noise: torch.Tensor,
        noisy_latents: torch.Tensor,
    ) -> None:
        """Log the step's sampling and value ranges at DEBUG level (host syncs: debug only)."""
        spread = f", std {sigma.std().item():.4f}" if sigma.numel() > 1 else ""
        logger.debug(
            "[step %d] flow matching x_t = (1 - sigma) x_0 + sigma noise | method %s | shift %s | batch %d\n"
            "  sigma [%.4f, %.4f] mean %.4f%s | timesteps [%.2f, %.2f]\n"
            "  clean [%.4f, %.4f] | noise [%.4f, %.4f] | noisy [%.4f, %.4f]",
            global_step,
            sampling_method,
            self.flow_shift,
            batch_size,
            sigma.min().item(),
            sigma.max().item(),
            sigma.mean().item(),
            spread,
            timesteps.min().item(),
            timesteps.max().item(),
            latents.min().item(),
            latents.max().item(),
            noise.min().item(),
            noise.max().item(),
            noisy_latents.min().item(),
            noisy_latents.max().item(),
        )
        bound = 1.5 * max(latents.abs().max().item(), noise.abs().max().item())
        if noisy_latents.abs().max().item() > bound:
            logger.warning("[step %d] noisy latents exceed 1.5x the larger of |x_0| and |noise|", global_step)

    def _log_loss_detailed(
        self,
        global_step: int,
        model_pred: torch.Tensor,
        target: torch.Tensor,
        loss_weight: torch.Tensor,
        unweighted_loss: torch.Tensor,
        weighted_loss: torch.Tensor,
    ) -> None:
        """Log prediction/target ranges, weights and both averages at DEBUG level."""
        unweighted, weighted = unweighted_loss.item(), weighted_loss.item()
        logger.debug(
            "[step %d] loss | pred [%.4f, %.4f] | target [%.4f, %.4f] | weight (%s) [%.4f, %.4f] mean %.4f\n"
            "  unweighted %.6f | weighted %.6f | ratio %.3f",
            global_step,
            model_pred.min().item(),
            model_pred.max().item(),
            target.min().item(),
            target.max().item(),
            self.loss_weighting_scheme if self.use_loss_weighting else "none",
            loss_weight.min().item(),
            loss_weight.max().item(),
            loss_weight.mean().item(),
            unweighted,
            weighted,
            weighted / max(unweighted, 1e-8),
        )


# ---------------------------------------------------------------------- factories


def _adapter_registry() -> dict[str, type[ModelAdapter]]:
    """``create_adapter``'s names: each registered family's (:mod:`flowtune.families`, in
    registration order), then ``"simple"``."""
    from flowtune.families import FAMILIES
    from flowtune.flow_matching.adapters.simple import SimpleAdapter

    registry: dict[str, type[ModelAdapter]] = {
        spec.adapter: spec.load_adapter_class() for spec in FAMILIES.values()
    }
    registry["simple"] = SimpleAdapter
    return registry


def create_adapter(adapter_type: str, **kwargs: Any) -> ModelAdapter:
    """Create a model adapter by name: a registered family's ``FamilySpec.adapter`` ("flux",
    "flux_kontext", "flux2"), or "simple".

    Raises:
        ValueError: "Unknown adapter type ..." (the message lists the available ones).
        AdapterArgumentsError: keyword arguments the adapter does not take (both a ``ValueError``
            and a ``TypeError``).
    """
    adapters = _adapter_registry()
    if adapter_type not in adapters:
        raise ValueError(f"Unknown adapter type: {adapter_type!r}; available: {', '.join(adapters)}")
    try:
        return adapters[adapter_type](**kwargs)
    except TypeError as exc:
        raise AdapterArgumentsError(f"bad arguments for the {adapter_type!r} adapter: {exc}") from None


def create_pipeline(
    adapter_type: str, adapter_kwargs: dict[str, Any] | None = None, **pipeline_kwargs: Any
) -> FlowMatchingPipeline:
    """Create a :class:`FlowMatchingPipeline` around the adapter named ``adapter_type``."""
    adapter = create_adapter(adapter_type, **(adapter_kwargs or {}))
    return FlowMatchingPipeline(model_adapter=adapter, **pipeline_kwargs)


__all__ = [
    "LOSS_WEIGHTING_SCHEMES",
    "TIMESTEP_SAMPLING_METHODS",
    "AdapterArgumentsError",
    "FlowMatchingPipeline",
    "LinearInterpolationSchedule",
    "LossExplosionError",
    "create_adapter",
    "create_pipeline",
    "logger",
]


def _preimage(f: Any, sigma: float, upper: bool = False, iterations: int = 64) -> float:
    """The v in [0, 1] where the non-decreasing f(v) reaches ``sigma``, by bisection in float64:
    the smallest v with f(v) >= sigma, or (``upper``) the largest v with f(v) <= sigma."""
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        value = float(f(torch.tensor([mid], dtype=torch.float64))[0])
        if value < sigma or (upper and value == sigma):
            lo = mid
        else:
            hi = mid
    return hi if not upper else lo


def _data_type(batch: dict[str, Any], latents: torch.Tensor) -> str:
    """The batch's ``data_type``, else "video" for 5-D latents and "image" otherwise."""
    return batch.get("data_type") or ("video" if latents.ndim == 5 else "image")
