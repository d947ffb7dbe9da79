"""One denoiser wrapper (k-diffusion's ``external.py`` / sgm's ``Denoiser``): network + prediction type -> x0_hat.

Every sampler asks the same question, "what is the clean sample, and the noise, behind this noisy input?", so
the conversions from what a network predicts live here and nowhere else. Two coordinate systems:

- the network's own time ``t`` and input ``x_in = signal(t) x0 + noise(t) eps``:
  VP (``eps``, ``v``, ``x0``): discrete step ``t``, ``signal = sqrt(abar_t)``, ``noise = sqrt(1 - abar_t)``;
  ``flow``: time ``t`` in [0, 1] (1 = data), ``signal = t``, ``noise = 1 - t``, the network predicts ``x0 - eps``;
  ``edm``: the time is sigma itself, ``signal = 1``, ``noise = sigma``, the network already returns x0_hat
  (EDM's preconditioned network, Karras et al. 2022).
- EDM's variance-exploding coordinates ``x = x_in / signal = x0 + sigma eps`` with ``sigma = noise / signal``:
  VP ``sigma = sqrt((1 - abar) / abar)``, flow ``sigma = (1 - t) / t``. The sigma-space samplers
  (Euler, Heun, DPM-Solver++, Euler ancestral, EDM's stochastic sampler) use these for every model type.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_diffusion.diffusion.schedules import NoiseSchedule, broadcast_like
from lightning_diffusion.errors import UserError

PredictionType = Literal["eps", "v", "x0", "flow", "edm"]
NetworkFn = Callable[[Tensor, Tensor], Tensor]
ThresholdFn = Callable[[Tensor], Tensor]
VP_PREDICTIONS = ("eps", "v", "x0")


def x0_eps_from_output(prediction: PredictionType, output: Tensor, x_in: Tensor, signal: Tensor,
                       noise: Tensor) -> tuple[Tensor, Tensor]:
    """``(x0_hat, eps_hat)`` from a network output at input rates ``(signal, noise)`` (see the module docstring)."""
    if prediction == "eps":
        return (x_in - noise * output) / signal, output
    if prediction == "v":  # v = signal eps - noise x0 with signal^2 + noise^2 = 1 (Salimans & Ho 2022)
        return signal * x_in - noise * output, noise * x_in + signal * output
    if prediction == "x0" or prediction == "edm":
        return output, (x_in - signal * output) / noise
    if prediction == "flow":  # x_in = t x0 + (1 - t) eps, output = x0 - eps
        return x_in + noise * output, x_in - signal * output
    raise UserError(f"unknown prediction type {prediction!r}; use one of {get_args(PredictionType)}")


def output_from_x0_eps(prediction: PredictionType, x0: Tensor, eps: Tensor, signal: Tensor, noise: Tensor) -> Tensor:
    """The network output that corresponds to ``(x0, eps)``: the inverse of :func:`x0_eps_from_output`."""
    if prediction == "eps":
        return eps
    if prediction == "v":
        return signal * eps - noise * x0
    if prediction == "x0" or prediction == "edm":
        return x0
    if prediction == "flow":
        return x0 - eps
    raise UserError(f"unknown prediction type {prediction!r}; use one of {get_args(PredictionType)}")


def to_x0_eps(prediction: PredictionType, model_output: Tensor, x_t: Tensor, schedule: NoiseSchedule,
              t: Tensor | int) -> tuple[Tensor, Tensor]:
    """``(x0_hat, eps_hat)`` from a VP model's output at step ``t``, computed in ``x_t``'s dtype."""
    signal, noise = schedule.signal_noise(t, x_t)
    return x0_eps_from_output(prediction, model_output.to(x_t.dtype), x_t, signal, noise)


class SamplingDenoiser:
    """Built once from a network, its prediction type, the VP schedule and optional x0_hat clipping / thresholding.

    ``network(x_in, time)`` is called in the network's own coordinates (a closure over the condition, or a
    guided combination, see ``guidance.py``). Answers :meth:`x0_eps_at` for ``(x_in, time)`` and
    :meth:`x0_eps` / ``__call__`` for ``(x, sigma)``. Clipping or thresholding replaces ``x0_hat`` and recomputes
    ``eps_hat`` from it, so ``x_in = signal x0_hat + noise eps_hat`` always holds.
    ``discrete``: VP times are rounded to integer steps (the sigma grids snap to the schedule's steps); else the
    network sees fractional steps, interpolated in log sigma.
    """

    def __init__(self, network: NetworkFn, prediction: PredictionType, schedule: NoiseSchedule | None = None, *,
                 clip_x0: float | None = None, threshold: ThresholdFn | None = None, discrete: bool = True) -> None:
        if prediction not in get_args(PredictionType):
            raise UserError(f"unknown prediction type {prediction!r}; use one of {get_args(PredictionType)}")
        if prediction in VP_PREDICTIONS and schedule is None:
            raise ValueError(f"prediction {prediction!r} needs the VP noise schedule")
        self.network, self.prediction, self.schedule = network, prediction, schedule
        self.clip_x0, self.threshold, self.discrete = clip_x0, threshold, discrete
        self._raw: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] = self._network_x0_eps

    @property
    def is_vp(self) -> bool:
        return self.prediction in VP_PREDICTIONS

    # ------------------------------------------------------------------ coordinates
    def rates(self, time: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(signal, noise)`` of the network input at ``time`` [B], shaped ``[B, 1, ..., 1]`` like ``like``."""
        if self.is_vp:
            return self.schedule.signal_noise(time, like)
        time = broadcast_like(time, like)
        if self.prediction == "flow":
            return time, 1 - time
        return torch.ones_like(time), time

    def sigma_to_time(self, sigma: float) -> int | float:
        """The network's time at noise level ``sigma`` (an int step for a discrete VP model)."""
        if self.is_vp:
            t = float(self.schedule.sigma_to_t(torch.tensor(sigma, dtype=torch.float64)))
            return int(round(t)) if self.discrete else t
        if self.prediction == "flow":
            return 1.0 / (1.0 + sigma)
        return sigma

    def time_to_sigma(self, time: int | float) -> float:
        """The noise level ``sigma = noise / signal`` of the network's ``time`` (0 for clean data)."""
        if self.is_vp:
            return float(self.schedule.t_to_sigma(torch.tensor(float(time), dtype=torch.float64)))
        if self.prediction == "flow":
            return math.inf if time == 0 else (1 - time) / time
        return float(time)

    def snap(self, sigma: float) -> float:
        """The nearest noise level the network can be asked about: a discrete VP model's nearest step's sigma."""
        if self.is_vp and self.discrete and sigma > 0:
            return self.time_to_sigma(self.sigma_to_time(sigma))
        return sigma

    def prior_scale(self, sigma: float) -> float:
        """Std of the sampler's start ``x = x_in / signal`` at ``sigma`` when ``x_in ~ N(0, I)``: VP and flow start
        from unit noise (``sqrt(1 + sigma^2)``), EDM from ``sigma`` (its data std is negligible there)."""
        return sigma if self.prediction == "edm" else math.sqrt(1 + sigma**2)

    def sigma_range(self) -> tuple[float, float]:
        """The smallest and largest noise level the network was trained on (EDM's 0.002..80 for flow / edm)."""
        if self.is_vp:  # a zero-terminal-SNR schedule's last sigma is infinite: start at the largest finite one
            finite = self.schedule.sigmas[torch.isfinite(self.schedule.sigmas)]
            return float(finite[0]), float(finite[-1])
        return 0.002, 80.0

    # ------------------------------------------------------------------ predictions
    def _network_x0_eps(self, x_in: Tensor, time: Tensor) -> tuple[Tensor, Tensor]:
        signal, noise = self.rates(time, x_in)
        return x0_eps_from_output(self.prediction, self.network(x_in, time).to(x_in.dtype), x_in, signal, noise)

    def x0_eps_at(self, x_in: Tensor, time: Tensor | int | float) -> tuple[Tensor, Tensor]:
        """``(x0_hat, eps_hat)`` for the network input ``x_in`` at its time (an int, a float, or a tensor [B])."""
        if not isinstance(time, Tensor):
            dtype = torch.long if isinstance(time, int) else (
                torch.float64 if x_in.dtype == torch.float64 else torch.float32)
            time = torch.full((x_in.shape[0],), time, dtype=dtype, device=x_in.device)
        x0, eps = self._raw(x_in, time)
        if self.threshold is None and self.clip_x0 is None:
            return x0, eps
        x0 = self.threshold(x0) if self.threshold is not None else x0.clamp(-self.clip_x0, self.clip_x0)
        signal, noise = self.rates(time, x_in)
        return x0, (x_in - signal * x0) / noise

    def x0_eps(self, x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        """``(x0_hat, eps_hat)`` for ``x = x0 + sigma eps`` (EDM's coordinates), ``sigma > 0``."""
        time = self.sigma_to_time(sigma)
        signal = 1 / math.sqrt(1 + sigma**2) if self.is_vp else (time if self.prediction == "flow" else 1.0)
        return self.x0_eps_at(x * signal, time)

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        """``x0_hat(x, sigma)``: the k-diffusion ``denoise(x, sigma)`` callable."""
        return self.x0_eps(x, sigma)[0]

    def wrap(self, guide: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]) -> SamplingDenoiser:
        """A copy whose unclipped ``(x0, eps)`` pass through ``guide(x_in, time, x0, eps)`` (classifier guidance)."""
        wrapped = copy.copy(self)
        inner = self._raw

        def raw(x_in: Tensor, time: Tensor) -> tuple[Tensor, Tensor]:
            return guide(x_in, time, *inner(x_in, time))

        wrapped._raw = raw
        return wrapped
