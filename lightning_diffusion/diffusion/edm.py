"""EDM (Karras et al. 2022): the preconditioned denoiser ``D(x, sigma)``, its training distribution and weighting,
and its probability-flow samplers.

Noise is variance exploding: ``x = x_0 + sigma n``. The network ``F`` never sees ``x`` or ``sigma`` raw (Table 1):
``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with ``c_skip = sd^2 / (sigma^2 + sd^2)``,
``c_out = sigma sd / sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``
(``sd`` = ``sigma_data``, the data's standard deviation, 0.5 for images in [-1, 1]). Training draws
``ln(sigma) ~ N(P_mean, P_std^2)`` and weights the x0 error by ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``,
which makes the effective target of ``F`` unit-variance at every sigma. ``D`` is an "x0 given sigma" prediction
(``SamplingDenoiser``'s ``edm`` type): every sigma-space sampler of ``sampling.py`` integrates it, on the Karras grid
from sigma 80 down to 0.002.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_diffusion.diffusion.schedules import broadcast_like
from lightning_diffusion.errors import UserError

Network = Callable[..., Tensor]


def edm_coefficients(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` of EDM's Table 1 for noise levels ``sigma`` [B], each shaped [B]."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def edm_denoise(network: Network, x: Tensor, sigma: Tensor, sigma_data: float = 0.5, **condition: Any) -> Tensor:
    """``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, **condition)``, the preconditioned x0 estimate."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, sigma_data)
    out = network(broadcast_like(c_in, x) * x, c_noise, **condition)
    return broadcast_like(c_skip, x) * x + broadcast_like(c_out, x) * out.to(x.dtype)


class EDMPrecond(nn.Module):
    """A network ``F(x, noise_label, **condition)`` wrapped as EDM's denoiser ``D(x, sigma, **condition) -> x0``."""

    def __init__(self, network: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        if sigma_data <= 0:
            raise UserError(f"sigma_data must be positive (0.5 for images in [-1, 1]); got {sigma_data}")
        self.network = network
        self.sigma_data = sigma_data

    def forward(self, x: Tensor, sigma: Tensor, **condition: Any) -> Tensor:
        return edm_denoise(self.network, x, sigma, self.sigma_data, **condition)


def sample_log_normal_sigma(
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> Tensor:
    """EDM's training noise levels: ``sigma = exp(P_mean + P_std n)``, ``n ~ N(0, 1)``, float32 [B]."""
    return (p_mean + p_std * torch.randn(batch_size, generator=generator, device=device)).exp()


def log_normal_quantiles(count: int, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """``count`` fixed noise levels: the log-normal's quantiles at the bin centres ``(i + 0.5) / count``."""
    centres = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    return (p_mean + p_std * normal.icdf(centres)).exp().float()


def edm_loss_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``, the weight of the x0 squared error, float32 [B]."""
    return ((sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2).float()
