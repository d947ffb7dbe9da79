"""How a denoiser trains, as three named choices: the objective, where its noise levels are drawn, how the loss
weighs them. The denoiser hands over a batch; this module noises it, asks the network and returns the loss.

| objective | noisy input | network time | target | noise_sampling (default first) | loss_weighting |
|---|---|---|---|---|---|
| eps, v, x0 | VP ``sqrt(abar) x0 + sqrt(1 - abar) n`` | integer step ``t`` | eps / v / x0 | uniform | uniform, min_snr |
| flow | ``t x1 + (1 - t) n`` | ``1000 t`` | velocity ``x1 - n`` | uniform, logit_normal (SD3) | uniform |
| edm | ``x0 + sigma n`` (EDM) | ``ln(sigma) / 4`` via EDM's preconditioning | x0 | log_normal | edm, uniform |

``noise_mean``/``noise_std`` are the location and scale of the log-normal sigma (EDM's P_mean -1.2, P_std 1.2) or
of the logit-normal time (SD3's m = 0, s = 1; here ``t = 1`` is data, so SD3's ``m`` is ``-noise_mean``).
``sigma_data`` is the data's standard deviation for EDM: 0.5 for pixels in [-1, 1], 1 for ``latent_scale``-scaled
latents. Sampling an EDM model: Euler or Heun on the Karras grid from sigma 80 down to 0.002 (``edm.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_diffusion.diffusion.edm import (
    edm_denoise, edm_loss_weight, log_normal_quantiles, sample_log_normal_sigma,
)
from lightning_diffusion.diffusion.objectives import (
    diffusion_loss, flow_interpolate, flow_velocity_target, min_snr_weight, sample_flow_time, training_target,
)
from lightning_diffusion.diffusion.schedules import NoiseSchedule, broadcast_like
from lightning_diffusion.errors import UserError

Objective = Literal["eps", "v", "x0", "flow", "edm"]
NoiseSampling = Literal["uniform", "log_normal", "logit_normal"]
LossWeighting = Literal["uniform", "min_snr", "edm"]
Predict = Callable[[Tensor, Tensor], Tensor]

OBJECTIVES = ("eps", "v", "x0", "flow", "edm")
# objective -> (allowed noise_sampling, allowed loss_weighting); the first of each is the default
CHOICES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "eps": (("uniform",), ("uniform", "min_snr")),
    "v": (("uniform",), ("uniform", "min_snr")),
    "x0": (("uniform",), ("uniform", "min_snr")),
    "flow": (("uniform", "logit_normal"), ("uniform",)),
    "edm": (("log_normal",), ("edm", "uniform")),
}
DISTRIBUTION_DEFAULTS = {"log_normal": (-1.2, 1.2), "logit_normal": (0.0, 1.0)}


def resolve_choices(objective: str, noise_sampling: str | None, loss_weighting: str | None,
                    min_snr_gamma: float | None) -> tuple[str, str]:
    """``(noise_sampling, loss_weighting)`` with the objective's defaults filled in (min_snr when a gamma is given),
    or a ``UserError`` naming the key for a combination that does not fit the objective."""
    if objective not in CHOICES:
        raise UserError(f"model.objective {objective!r} is unknown: use one of {', '.join(OBJECTIVES)}")
    samplings, weightings = CHOICES[objective]
    sampling = noise_sampling or samplings[0]
    default_weighting = "min_snr" if min_snr_gamma and "min_snr" in weightings else weightings[0]
    weighting = loss_weighting or default_weighting
    if sampling not in samplings:
        raise UserError(f"model.noise_sampling {sampling!r} does not fit model.objective {objective!r}: use "
                        f"{' or '.join(samplings)}")
    if weighting not in weightings:
        raise UserError(f"model.loss_weighting {weighting!r} does not fit model.objective {objective!r}: use "
                        f"{' or '.join(weightings)}")
    if weighting == "min_snr" and not (min_snr_gamma and min_snr_gamma > 0):
        raise UserError("model.loss_weighting min_snr needs model.min_snr_gamma > 0 (e.g. 5)")
    if min_snr_gamma and weighting != "min_snr":
        raise UserError(f"model.min_snr_gamma is set but model.loss_weighting is {weighting!r}: remove "
                        f"min_snr_gamma or set loss_weighting: min_snr")
    return sampling, weighting


class TrainingObjective:
    """The objective's noisy inputs, network call, targets, noise levels and loss weights (module docstring)."""

    def __init__(
        self,
        objective: Objective,
        schedule: NoiseSchedule,
        noise_sampling: NoiseSampling | None = None,
        loss_weighting: LossWeighting | None = None,
        min_snr_gamma: float | None = None,
        noise_mean: float | None = None,
        noise_std: float | None = None,
        sigma_data: float = 0.5,
    ) -> None:
        self.name = objective
        self.schedule = schedule
        self.noise_sampling, self.loss_weighting = resolve_choices(objective, noise_sampling, loss_weighting,
                                                                   min_snr_gamma)
        self.min_snr_gamma = min_snr_gamma
        defaults = DISTRIBUTION_DEFAULTS.get(self.noise_sampling)
        if defaults is None and (noise_mean is not None or noise_std is not None):
            raise UserError(f"model.noise_mean/noise_std shape a log_normal or logit_normal noise_sampling, not "
                            f"{self.noise_sampling!r}: remove them")
        self.noise_mean = defaults[0] if noise_mean is None and defaults else noise_mean
        self.noise_std = defaults[1] if noise_std is None and defaults else noise_std
        if self.noise_std is not None and self.noise_std <= 0:
            raise UserError(f"model.noise_std must be positive; got {self.noise_std}")
        if sigma_data <= 0:
            raise UserError(f"model.sigma_data must be positive (0.5 for pixels in [-1, 1]); got {sigma_data}")
        self.sigma_data = sigma_data

    @property
    def continuous(self) -> bool:
        """Whether times are floats (flow time, EDM sigma) rather than integer VP steps."""
        return self.name in ("flow", "edm")

    def predict(self, network: Callable[..., Tensor], x_t: Tensor, t: Tensor, condition: dict[str, Tensor]) -> Tensor:
        """The model output in the objective's parameterisation (EDM: the preconditioned x0 estimate)."""
        if self.name == "edm":
            return edm_denoise(network, x_t, t, self.sigma_data, **condition)
        return network(x_t, t.float() * 1000 if self.name == "flow" else t.float(), **condition)

    def sample_times(self, batch_size: int, device: torch.device | str,
                     generator: torch.Generator | None = None) -> Tensor:
        """Training times [B]: VP steps, flow times in (0, 1) or EDM noise levels, per ``noise_sampling``."""
        if self.name == "edm":
            return sample_log_normal_sigma(batch_size, generator, device, self.noise_mean, self.noise_std)
        if self.name == "flow":
            loc, scale = (self.noise_mean, self.noise_std) if self.noise_sampling == "logit_normal" else (0.0, 1.0)
            return sample_flow_time(batch_size, generator, device, self.noise_sampling, loc, scale)
        return torch.randint(0, self.schedule.num_timesteps, (batch_size,), generator=generator, device=device)

    def fixed_times(self, count: int) -> Tensor:
        """``count`` validation times, the same in every run: bin centres of the time range (flow, VP) or of the
        training distribution's quantiles (EDM sigma)."""
        if self.name == "edm":
            return log_normal_quantiles(count, self.noise_mean, self.noise_std)
        centres = (torch.arange(count, dtype=torch.float64) + 0.5) / count
        return centres.float() if self.name == "flow" else (centres * self.schedule.num_timesteps).long()

    def time_label(self, time: Any) -> str:
        """How a validation time names its metric: ``500`` (VP step), ``0.438`` (flow t), ``1.23`` (sigma)."""
        if self.name == "edm":
            return f"sigma{time:.3g}"
        return f"{time:.3f}" if self.name == "flow" else str(time)

    def loss(self, predict: Predict, x0: Tensor, noise: Tensor, t: Tensor, weighted: bool = True) -> Tensor:
        """The objective's (weighted) mean squared error for data ``x0``, noise and times ``t``."""
        weight = None
        if self.name == "flow":
            x_t, target = flow_interpolate(noise, x0, t), flow_velocity_target(noise, x0)
        elif self.name == "edm":
            x_t, target = x0 + broadcast_like(t, x0) * noise, x0
            if weighted and self.loss_weighting == "edm":
                weight = edm_loss_weight(t, self.sigma_data)
        else:
            x_t = self.schedule.add_noise(x0, noise, t)
            target = training_target(self.name, x0, noise, self.schedule, t)
            if weighted and self.loss_weighting == "min_snr":
                weight = min_snr_weight(self.schedule, t, self.min_snr_gamma, self.name)
        return diffusion_loss(predict(x_t, t), target, weight)
