"""Samplers as short pure functions over a :class:`SamplingDenoiser` (the k-diffusion / EDM style).

Every sampler is ``sampler(denoiser, x, grid, generator=None, callback=None, ..., progress=False) -> x0``:
DDPM and DDIM step a VP model over descending integer ``timesteps`` (``x`` in the model's own scale,
``x_T ~ N(0, I)``); the probability-flow Euler / Heun samplers (and those in ``solvers.py``) walk a decreasing
``sigmas`` grid ending with 0 in EDM's coordinates ``x = x0 + sigma eps`` (start: ``noise * prior_scale``);
flow Euler / Heun integrate a flow model over increasing times from 0 (noise) to 1 (data).
Random draws take ``generator`` (a ``torch.Generator`` or a per-sample ``SampleGenerators``), so a seed fixes
the samples. ``callback(step, x, x0_hat)`` sees every step. Everything runs under ``torch.no_grad()``
(classifier guidance turns gradients back on inside the denoiser).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_diffusion.diffusion.denoisers import NetworkFn, SamplingDenoiser
from lightning_diffusion.diffusion.seeding import Generator, noise_like
from lightning_diffusion.errors import UserError

Callback = Callable[[int, Tensor, Tensor], None]
ModelFn = NetworkFn  # a network callable ``(x_in, time) -> output``, what guidance wrappers take and return
Variance = Literal["beta", "posterior"]


def _abar(denoiser: SamplingDenoiser, t: int) -> float:
    """``abar_t`` as a Python float (float64); ``t < 0`` is clean data, ``abar = 1``."""
    if not denoiser.is_vp:
        raise UserError(f"DDPM / DDIM step a VP model (eps, v, x0); this one is {denoiser.prediction!r}: "
                        "use a sigma-space sampler (euler, heun, dpmpp_2m, euler_ancestral, edm)")
    return 1.0 if t < 0 else float(denoiser.schedule.alphas_cumprod[t])


def report(callback: Callback | None, step: int, x: Tensor, x0: Tensor) -> None:
    if callback is not None:
        callback(step, x, x0)


def ddpm_step(denoiser: SamplingDenoiser, x_t: Tensor, t: int, t_prev: int | None = None,
              variance: Variance = "posterior", generator: Generator = None, noise: Tensor | None = None,
              ) -> tuple[Tensor, Tensor]:
    """One ancestral step ``x_t -> x_{t_prev}`` of DDPM (Ho et al. 2020, eq. 7), ``t_prev = t - 1`` by default;
    returns ``(x_prev, x0_hat)``.

    Mean: the posterior ``q(x_prev | x_t, x0_hat)``; variance: ``beta_t`` or the posterior ``beta~_t``, with
    ``beta_t = 1 - abar_t / abar_prev`` so respaced steps (Nichol & Dhariwal 2021) use the same formula.
    No noise is added on the final step (``t_prev = -1``).
    """
    t_prev = t - 1 if t_prev is None else t_prev
    abar_t, abar_prev = _abar(denoiser, t), _abar(denoiser, t_prev)
    beta = 1 - abar_t / abar_prev
    x0, _ = denoiser.x0_eps_at(x_t, t)
    mean = (math.sqrt(abar_prev) * beta / (1 - abar_t)) * x0 + (
        math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t)
    ) * x_t
    if t_prev < 0:
        return mean, x0
    if variance == "beta":
        var = beta
    elif variance == "posterior":
        var = (1 - abar_prev) / (1 - abar_t) * beta
    else:
        raise UserError(f"unknown DDPM variance {variance!r}; use 'beta' or 'posterior'")
    noise = noise_like(x_t, generator) if noise is None else noise
    return mean + math.sqrt(var) * noise, x0


def ddim_step(denoiser: SamplingDenoiser, x_t: Tensor, t: int, t_prev: int, eta: float = 0.0,
              generator: Generator = None, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One DDIM step ``x_t -> x_{t_prev}`` (Song et al. 2021, eq. 12), ``t_prev = -1`` meaning ``abar_prev = 1``;
    returns ``(x_prev, x0_hat)``.

    ``x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z`` with
    ``sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)``: eta = 0 is deterministic,
    eta = 1 is DDPM's posterior variance.
    """
    abar_t, abar_prev = _abar(denoiser, t), _abar(denoiser, t_prev)
    x0, eps = denoiser.x0_eps_at(x_t, t)
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * (noise_like(x_t, generator) if noise is None else noise)
    return x_prev, x0


@torch.no_grad()
def ddpm_sample(denoiser: SamplingDenoiser, x: Tensor, timesteps: Sequence[int], generator: Generator = None,
                callback: Callback | None = None, variance: Variance = "posterior", progress: bool = False) -> Tensor:
    """Ancestral DDPM sampling from ``x = x_T ~ N(0, I)`` over descending ``timesteps`` (all ``T``, or respaced)."""
    for i, t in enumerate(tqdm(timesteps, desc="DDPM", disable=not progress)):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x, x0 = ddpm_step(denoiser, x, t, t_prev, variance, generator)
        report(callback, i, x, x0)
    return x


@torch.no_grad()
def ddim_sample(denoiser: SamplingDenoiser, x: Tensor, timesteps: Sequence[int], generator: Generator = None,
                callback: Callback | None = None, eta: float = 0.0, progress: bool = False) -> Tensor:
    """DDIM sampling over descending ``timesteps``, each step going to the next one in the list (the last to 0)."""
    if eta < 0:
        raise UserError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM's variance); got {eta}")
    for i, t in enumerate(tqdm(timesteps, desc="DDIM", disable=not progress)):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x, x0 = ddim_step(denoiser, x, t, t_prev, eta, generator)
        report(callback, i, x, x0)
    return x


def _ode(denoiser: SamplingDenoiser, x: Tensor, sigmas: Tensor, heun: bool, callback: Callback | None,
         progress: bool) -> Tensor:
    levels = [float(s) for s in sigmas]
    for i in tqdm(range(len(levels) - 1), desc=f"ODE ({'heun' if heun else 'euler'})", disable=not progress):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0, d = denoiser.x0_eps(x, sigma)
        x_next = x + (sigma_next - sigma) * d
        if heun and sigma_next > 0:
            x_next = x + (sigma_next - sigma) * (d + denoiser.x0_eps(x_next, sigma_next)[1]) / 2
        x = x_next
        report(callback, i, x, x0)
    return x


@torch.no_grad()
def euler_sample(denoiser: SamplingDenoiser, x: Tensor, sigmas: Tensor, generator: Generator = None,
                 callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Euler steps of the probability-flow ODE ``dx / dsigma = eps_hat(x, sigma)`` (Karras et al. 2022, Alg. 1).

    For a VP model this is the ODE in ``z = x_t / sqrt(abar)``; Euler over the discrete grid is exactly DDIM with
    eta = 0, and for a flow model it is flow Euler on the times ``t = 1 / (1 + sigma)``.
    """
    return _ode(denoiser, x, sigmas, False, callback, progress)


@torch.no_grad()
def heun_sample(denoiser: SamplingDenoiser, x: Tensor, sigmas: Tensor, generator: Generator = None,
                callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Heun's second-order steps of the probability-flow ODE; the last step, to sigma = 0, is an Euler step."""
    return _ode(denoiser, x, sigmas, True, callback, progress)


def _flow(denoiser: SamplingDenoiser, x: Tensor, times: Sequence[float], heun: bool, callback: Callback | None,
          progress: bool) -> Tensor:
    if denoiser.prediction != "flow":
        raise UserError(f"flow samplers integrate a flow model; this one is {denoiser.prediction!r}")

    def velocity(x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        x0, eps = denoiser.x0_eps_at(x, t)
        return x0, x0 - eps

    steps = len(times) - 1
    name = f"flow ({'heun' if heun else 'euler'})"
    for i in tqdm(range(steps), desc=name, disable=not progress):
        t, t_next = float(times[i]), float(times[i + 1])
        x0, d = velocity(x, t)
        x_next = x + (t_next - t) * d
        if heun:
            x_next = x + (t_next - t) * (d + velocity(x_next, t_next)[1]) / 2
        x = x_next
        report(callback, i, x, x0)
    return x


@torch.no_grad()
def flow_euler_sample(denoiser: SamplingDenoiser, x: Tensor, times: Sequence[float], generator: Generator = None,
                      callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Euler integration of ``dx/dt = v(x, t)`` from noise ``x`` at ``times[0] = 0`` to data at ``times[-1] = 1``."""
    return _flow(denoiser, x, times, False, callback, progress)


@torch.no_grad()
def flow_heun_sample(denoiser: SamplingDenoiser, x: Tensor, times: Sequence[float], generator: Generator = None,
                     callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Heun's second-order integration of the flow: two velocity evaluations per step."""
    return _flow(denoiser, x, times, True, callback, progress)
