"""Where the samplers stop: discrete timestep subsets (diffusers' ``timestep_spacing``) and sigma grids.

Sigma grids are decreasing float64 tensors ending with 0: ``discrete`` takes the sigmas of the schedule's steps
``discrete_timesteps(T, steps, spacing)``; ``karras`` is EDM's rho-spaced ramp (Karras et al. 2022, eq. 5).
For a discrete VP model every level is snapped to the nearest step's sigma (in log sigma) and repeats dropped,
so the network sees only the integer steps it was trained on.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_diffusion.diffusion.denoisers import SamplingDenoiser
from lightning_diffusion.errors import UserError

Spacing = Literal["leading", "trailing", "linspace"]
Grid = Literal["karras", "discrete"]


def discrete_timesteps(num_timesteps: int, steps: int, spacing: Spacing = "leading") -> list[int]:
    """Descending sub-sequence of ``steps`` timesteps, spaced as diffusers' ``timestep_spacing`` (Lin et al. 2023).

    ``leading``: ``0, k, 2k, ...`` with ``k = T // steps``; ``trailing``: ``round(T - i T/steps) - 1``, which starts
    at ``T - 1``; ``linspace``: ``round(linspace(0, T - 1, steps))``.
    """
    if not 1 <= steps <= num_timesteps:
        raise UserError(f"sampling steps must be between 1 and the {num_timesteps} training timesteps; got {steps}")
    if spacing == "leading":
        ts = [i * (num_timesteps // steps) for i in range(steps)]
    elif spacing == "trailing":
        ratio = num_timesteps / steps
        ts = [round(num_timesteps - i * ratio) - 1 for i in range(steps)][::-1]
    elif spacing == "linspace":
        ts = [round(v) for v in torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).tolist()]
    else:
        raise UserError(f"unknown timestep spacing {spacing!r}; use 'leading', 'trailing' or 'linspace'")
    return sorted(ts, reverse=True)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> Tensor:
    """EDM's noise levels (Karras et al. 2022, eq. 5): ``steps`` values from ``sigma_max`` down to ``sigma_min``."""
    if rho <= 0:
        raise UserError(f"rho must be > 0 (EDM uses 7); got {rho}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def flow_times(steps: int) -> list[float]:
    """Uniform flow times from 0 (noise) to 1 (data): ``steps + 1`` points."""
    if steps < 1:
        raise UserError(f"sampling steps must be >= 1; got {steps}")
    return torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()


def sigma_grid(denoiser: SamplingDenoiser, steps: int, grid: Grid = "karras", *, spacing: Spacing = "trailing",
               rho: float = 7.0, sigma_max: float | None = 80.0) -> Tensor:
    """The decreasing float64 sigma grid a sigma-space sampler walks, ending with 0.

    ``karras``: from ``min(sigma_max, the model's largest)`` down to its smallest sigma. EDM's 80 (signal rate
    1/80, near the linear schedule's 1/157 at t = T-1) saves the steps the cosine schedule's ~2e4 tail would
    spend; ``None`` starts at the model's top. ``discrete``: the sigmas of ``discrete_timesteps`` (VP only; on a
    zero-terminal-SNR schedule without the infinite first level: DDIM / DDPM start there exactly).
    """
    low, high = denoiser.sigma_range()
    if grid == "karras":
        sigmas = karras_sigmas(low, high if sigma_max is None else min(sigma_max, high), steps, rho)
    elif grid == "discrete":
        if not denoiser.is_vp:
            raise UserError(f"the discrete grid needs a VP model (eps, v, x0); this one is {denoiser.prediction!r}: "
                            "use grid karras")
        schedule = denoiser.schedule
        sigmas = schedule.sigmas[discrete_timesteps(schedule.num_timesteps, steps, spacing)]
        sigmas = sigmas[torch.isfinite(sigmas)]  # zero terminal SNR: sigma-space samplers start below infinity
    else:
        raise UserError(f"unknown sigma grid {grid!r}; use 'karras' or 'discrete'")
    if denoiser.is_vp and denoiser.discrete:
        schedule = denoiser.schedule
        sigmas = torch.unique_consecutive(schedule.t_to_sigma(schedule.sigma_to_t(sigmas).round()))
    return torch.cat([sigmas, sigmas.new_zeros(1)])
