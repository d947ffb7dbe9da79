"""What the denoiser is trained to predict, and the losses: DDPM eps/v/x0 parameterisations and flow matching.

VP parameterisations (``x_t = a x_0 + s eps`` with ``a = sqrt(abar_t)``, ``s = sqrt(1 - abar_t)``):
``eps``; ``v = a eps - s x_0`` (Salimans & Ho 2022); ``x0``. Any one determines the other two given ``x_t``.

Flow matching (rectified flow), the project's convention: ``x_t = t x_1 + (1 - t) x_0`` with ``x_0 ~ N(0, I)`` the
noise and ``x_1`` the data, velocity ``x_1 - x_0``, integrated from ``t = 0`` (noise) to ``t = 1`` (data).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_diffusion.diffusion.denoisers import (  # noqa: F401  the conversions live in denoisers.py
    output_from_x0_eps, to_x0_eps, x0_eps_from_output,
)
from lightning_diffusion.diffusion.schedules import NoiseSchedule, broadcast_like
from lightning_diffusion.errors import UserError

Prediction = Literal["eps", "v", "x0"]
FlowTimeDistribution = Literal["uniform", "logit_normal"]


def check_prediction(prediction: str) -> None:
    """Raise a ``UserError`` unless ``prediction`` is one of ``eps``, ``v``, ``x0``."""
    if prediction not in get_args(Prediction):
        raise UserError(f"unknown prediction type {prediction!r}; set `prediction` to one of {get_args(Prediction)}")


def training_target(prediction: Prediction, x0: Tensor, eps: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The regression target for ``x_t = schedule.add_noise(x0, eps, t)``: ``eps``, ``v`` or ``x0``."""
    signal, noise = schedule.signal_noise(t, x0)
    return output_from_x0_eps(prediction, x0, eps, signal, noise)


def min_snr_weight(schedule: NoiseSchedule, t: Tensor, gamma: float, prediction: Prediction) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an MSE in the given parameterisation, float32 [B].

    The x0-MSE weight ``min(SNR, gamma)`` becomes ``min(SNR, gamma) / SNR`` for an eps-MSE and
    ``min(SNR, gamma) / (SNR + 1)`` for a v-MSE, since ``||eps err||^2 = SNR ||x0 err||^2`` and
    ``||v err||^2 = (SNR + 1) ||x0 err||^2``.
    """
    check_prediction(prediction)
    if gamma <= 0:
        raise UserError(f"min-SNR gamma must be positive; got {gamma}")
    snr = schedule.snr(t)
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "eps":
        weight = clipped / snr
    elif prediction == "v":
        weight = clipped / (snr + 1)
    else:
        weight = clipped
    return weight.float()


def diffusion_loss(model_output: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Squared error averaged over all but the batch dim, then a (weighted) batch mean, in float32."""
    per_sample = (model_output.float() - target.float()).square().flatten(1).mean(dim=1)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample)
    return per_sample.mean()


def flow_interpolate(noise: Tensor, data: Tensor, t: Tensor) -> Tensor:
    """``x_t = t data + (1 - t) noise`` with ``t`` [B] in [0, 1]."""
    t = broadcast_like(t, data)
    return t * data + (1 - t) * noise


def flow_velocity_target(noise: Tensor, data: Tensor) -> Tensor:
    """The conditional velocity ``dx_t / dt = data - noise`` that the flow model regresses."""
    return data - noise


def sample_flow_time(
    batch_size: int,
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
    distribution: FlowTimeDistribution = "uniform",
    loc: float = 0.0,
    scale: float = 1.0,
) -> Tensor:
    """Training times in (0, 1): uniform, or logit-normal ``sigmoid(N(loc, scale^2))`` (Esser et al. 2024).

    SD3 counts time as the noise fraction; here ``t = 1`` is data, so SD3's logit-normal mean ``m`` is ``loc = -m``.
    ``generator`` (on ``device``) makes the draw reproducible.
    """
    if distribution == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    if distribution == "logit_normal":
        return torch.sigmoid(loc + scale * torch.randn(batch_size, generator=generator, device=device))
    raise UserError(f"unknown flow time distribution {distribution!r}; use 'uniform' or 'logit_normal'")
