"""Discrete variance-preserving noise schedules (DDPM, Ho et al. 2020; cosine, Nichol & Dhariwal 2021).

Timesteps are indices ``t = 0 .. T-1``; ``alphas_cumprod[t] = prod_{s <= t} (1 - beta_s)`` and ``t = -1`` stands for
clean data (``abar = 1``). The buffers are float64 CPU tensors; lookups cast to the caller's dtype and device at use.
Fractional ``t`` (the probability-flow sampler's continuous time) interpolates ``log sigma`` between neighbouring
steps, ``sigma = sqrt((1 - abar) / abar)``, as k-diffusion's ``DiscreteSchedule`` does.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_diffusion.errors import UserError

ScheduleName = Literal["linear", "cosine"]


def broadcast_like(values: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample ``values`` [B] (or a scalar) to ``[B, 1, ..., 1]`` in ``like``'s dtype and device."""
    values = values.to(device=like.device, dtype=like.dtype)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


class NoiseSchedule:
    """A discrete VP schedule given by its ``betas``; build one with :meth:`linear` or :meth:`cosine`."""

    def __init__(self, betas: Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all() or (
                ((betas[:-1] > 0) & (betas[:-1] < 1)).all() and betas[-1] == 1)):
            raise UserError(f"noise schedule betas must be a 1-D sequence of at least 2 values in (0, 1) (the last "
                            f"may be 1: zero terminal SNR); got {betas}")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_timesteps = len(betas)
        self.log_sigmas = 0.5 * (torch.log1p(-self.alphas_cumprod) - torch.log(self.alphas_cumprod))
        self._on_device: dict[tuple[str, torch.device], Tensor] = {}

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """DDPM's betas, linear from ``beta_start`` to ``beta_end``."""
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Improved-DDPM cosine schedule: ``abar(t) = f(t) / f(0)``, ``f(t) = cos^2((t/T + s) / (1 + s) * pi/2)``.

        ``beta_t = min(1 - f(t+1) / f(t), max_beta)`` keeps the last steps finite (``f(T) = 0``).
        """
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return cls(torch.clamp(1 - f[1:] / f[:-1], max=max_beta))

    def zero_terminal_snr(self) -> NoiseSchedule:
        """The schedule rescaled to zero SNR at ``t = T-1`` (Lin et al. 2023, Alg. 1): ``sqrt(abar)`` shifted and
        scaled so its last value is 0 and its first unchanged, so the last step is pure noise, as at sampling.
        Only a v- (or x0-) predicting model can be trained on it: eps is the input itself at SNR 0."""
        root = self.alphas_cumprod.sqrt()
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])
        abar = root**2
        return NoiseSchedule(1 - torch.cat([abar[:1], abar[1:] / abar[:-1]]))

    @property
    def terminal_snr_zero(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def _table(self, name: str, device: torch.device) -> Tensor:
        """A float64 buffer on ``device`` (float32 where the device lacks float64, e.g. MPS), cached."""
        key = (name, device)
        if key not in self._on_device:
            table = getattr(self, name)
            self._on_device[key] = table.to(device, torch.float32 if device.type == "mps" else torch.float64)
        return self._on_device[key]

    def _lookup(self, name: str, t: Tensor) -> Tensor:
        """Gather a buffer at integer steps ``t`` (``t = -1`` reads the clean-data value)."""
        table = self._table(name, t.device)
        clean = torch.ones((), dtype=table.dtype, device=t.device)
        if name == "log_sigmas":
            clean = torch.full((), -math.inf, dtype=table.dtype, device=t.device)
        return torch.where(t >= 0, table[t.clamp(min=0)], clean)

    def alpha_bar(self, t: Tensor | int) -> Tensor:
        """``abar_t`` in float64 (float32 on MPS); integer ``t`` is exact, fractional ``t`` interpolates log sigma."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            return torch.sigmoid(-2 * torch.log(self.t_to_sigma(t)))
        return self._lookup("alphas_cumprod", t.long())

    def signal_noise(self, t: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))`` shaped ``[B, 1, ..., 1]`` in ``like``'s dtype and device."""
        t = torch.as_tensor(t, device=like.device)
        abar = self.alpha_bar(t)
        return broadcast_like(abar.sqrt(), like), broadcast_like((1 - abar).sqrt(), like)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor | int) -> Tensor:
        """A sample of ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` given the noise ``eps``."""
        signal, noise = self.signal_noise(t, x0)
        return signal * x0 + noise * eps

    def snr(self, t: Tensor | int) -> Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` in float64."""
        abar = self.alpha_bar(torch.as_tensor(t))
        return abar / (1 - abar)

    @property
    def sigmas(self) -> Tensor:
        """Noise-to-signal ratios ``sqrt((1 - abar) / abar)`` of the steps, increasing in ``t`` (EDM's sigma)."""
        return self.log_sigmas.exp()

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at continuous ``t`` in ``[0, T-1]``, linear in ``log sigma`` between steps (``t < 0`` gives 0)."""
        log_sigmas = self._table("log_sigmas", t.device)
        t = t.to(log_sigmas.dtype).clamp(max=self.num_timesteps - 1)
        low = t.floor().long().clamp(min=0)
        high = t.ceil().long().clamp(min=0)
        w = t - low
        sigma = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
        return torch.where(t < 0, torch.zeros_like(sigma), sigma)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The inverse of :meth:`t_to_sigma` on ``[sigma_min, sigma_max]`` (clamped outside), float ``t``."""
        log_sigmas = self._table("log_sigmas", sigma.device)
        log_sigma = sigma.to(log_sigmas.dtype).log().clamp(log_sigmas[0], log_sigmas[-1])
        high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, self.num_timesteps - 1)
        low = high - 1
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        return low + w

    def __repr__(self) -> str:
        first, last = self.betas[0].item(), self.betas[-1].item()
        return f"NoiseSchedule(num_timesteps={self.num_timesteps}, betas={first:.3g}..{last:.3g})"


def make_schedule(name: ScheduleName, num_timesteps: int = 1000, zero_terminal_snr: bool = False) -> NoiseSchedule:
    """The schedule a config names: ``"linear"`` (DDPM) or ``"cosine"`` (improved DDPM), optionally rescaled to
    zero terminal SNR (:meth:`NoiseSchedule.zero_terminal_snr`)."""
    if name == "linear":
        schedule = NoiseSchedule.linear(num_timesteps)
    elif name == "cosine":
        schedule = NoiseSchedule.cosine(num_timesteps)
    else:
        raise UserError(f"unknown noise schedule {name!r}; set `schedule` to 'linear' or 'cosine'")
    return schedule.zero_terminal_snr() if zero_terminal_snr else schedule
