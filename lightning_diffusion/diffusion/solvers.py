"""Few-step and stochastic sigma-space samplers: DPM-Solver++(2M) and its SDE variant, Euler ancestral, and EDM's
stochastic sampler. Same signature as ``samplers.py``: ``(denoiser, x, sigmas, generator, callback, ...)`` with
``x = x0 + sigma eps`` at ``sigmas[0]`` and a decreasing grid ending with 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_diffusion.diffusion.denoisers import SamplingDenoiser
from lightning_diffusion.diffusion.samplers import Callback, report
from lightning_diffusion.diffusion.seeding import Generator, noise_like
from lightning_diffusion.errors import UserError


@torch.no_grad()
def dpmpp_2m_sample(denoiser: SamplingDenoiser, x: Tensor, sigmas: Tensor, generator: Generator = None,
                    callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): a multistep second-order solver in ``lambda = -log sigma``.

    ``x_next = (sigma_next / sigma) x - expm1(-h) D``, ``h = lambda_next - lambda``, where ``D`` is x0_hat on the
    first step and on the last one (to sigma = 0), else ``(1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev`` with
    ``r = h_prev / h``. One network evaluation per step, as DDIM, but second order.
    """
    levels = [float(s) for s in sigmas]
    previous: Tensor | None = None
    for i in tqdm(range(len(levels) - 1), desc="DPM-Solver++(2M)", disable=not progress):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0, _ = denoiser.x0_eps(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma / sigma_next)
            d = x0
            if previous is not None:
                r = math.log(levels[i - 1] / sigma) / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
        previous = x0
        report(callback, i, x, x0)
    return x


@torch.no_grad()
def dpmpp_2m_sde_sample(denoiser: SamplingDenoiser, x: Tensor, sigmas: Tensor, generator: Generator = None,
                        callback: Callback | None = None, eta: float = 1.0, progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, midpoint form as in diffusers' ``sde-dpmsolver++``):
    ``x_next = (sigma_next/sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) D (+ second-order term)
    + sigma_next sqrt(1 - e^{-2 eta h}) z``; ``eta = 0`` is the ODE solver."""
    levels = [float(s) for s in sigmas]
    previous: Tensor | None = None
    for i in tqdm(range(len(levels) - 1), desc="DPM-Solver++(2M) SDE", disable=not progress):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0, _ = denoiser.x0_eps(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            x = (sigma_next / sigma) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * x0
            if previous is not None:
                r = math.log(levels[i - 1] / sigma) / h
                x = x - 0.5 * math.expm1(-h - eta_h) * (1 / r) * (x0 - previous)
            if eta > 0:
                x = x + noise_like(x, generator) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h))
        previous = x0
        report(callback, i, x, x0)
    return x


def ancestral_levels(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)``: a deterministic step to ``sigma_down`` then fresh noise of std ``sigma_up``, with
    ``sigma_down^2 + sigma_up^2 = sigma_next^2``; ``eta = 1`` is the DDPM posterior's noise, 0 the ODE step."""
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


@torch.no_grad()
def euler_ancestral_sample(denoiser: SamplingDenoiser, x: Tensor, sigmas: Tensor, generator: Generator = None,
                           callback: Callback | None = None, eta: float = 1.0, s_noise: float = 1.0,
                           progress: bool = False) -> Tensor:
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``, diffusers ``EulerAncestralDiscreteScheduler``): an
    Euler step to ``sigma_down``, then noise ``s_noise * sigma_up * z`` back up to ``sigma_next``."""
    levels = [float(s) for s in sigmas]
    for i in tqdm(range(len(levels) - 1), desc="Euler ancestral", disable=not progress):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0, d = denoiser.x0_eps(x, sigma)
        down, up = ancestral_levels(sigma, sigma_next, eta)
        x = x + (down - sigma) * d
        if up > 0:
            x = x + noise_like(x, generator) * s_noise * up
        report(callback, i, x, x0)
    return x


@torch.no_grad()
def edm_sample(denoiser: SamplingDenoiser, x: Tensor, sigmas: Tensor, generator: Generator = None,
               callback: Callback | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
               s_tmax: float = math.inf, s_noise: float = 1.0, progress: bool = False) -> Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): raise sigma by ``gamma = min(S_churn / N,
    sqrt(2) - 1)`` (inside ``[S_tmin, S_tmax]``) adding matching noise, then a Heun step down to the next level.
    ``S_churn = 0`` is Algorithm 1 (deterministic Heun). A discrete VP model's raised level snaps to its nearest
    step, so the network sees only steps it was trained on."""
    if s_churn < 0:
        raise UserError(f"S_churn must be >= 0 (0 = deterministic Heun; EDM uses 40-80); got {s_churn}")
    levels = [float(s) for s in sigmas]
    steps = len(levels) - 1
    for i in tqdm(range(steps), desc="EDM", disable=not progress):
        sigma, sigma_next = levels[i], levels[i + 1]
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = denoiser.snap(sigma * (1 + gamma))
        if sigma_hat > sigma:
            x = x + noise_like(x, generator) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
        x0, d = denoiser.x0_eps(x, sigma_hat)
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:
            x_next = x + (sigma_next - sigma_hat) * (d + denoiser.x0_eps(x_next, sigma_next)[1]) / 2
        x = x_next
        report(callback, i, x, x0)
    return x
