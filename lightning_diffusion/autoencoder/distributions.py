"""The encoder's posterior q(z | x) = N(mu, diag(sigma^2)), with the reparameterised sample and KL to N(0, I)."""

from __future__ import annotations

import torch
from torch import Tensor

LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussian:
    """Diagonal Gaussian over latents `[B, C, h, w]`; log-variance clamped to `LOGVAR_RANGE` for stability."""

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor) -> "DiagonalGaussian":
        """Split the encoder's `2C` output channels into mean and log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mu + sigma * eps (differentiable in mu and sigma)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions: 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)."""
        terms = self.mean.float().pow(2) + self.logvar.float().exp() - 1.0 - self.logvar.float()
        return 0.5 * terms.flatten(1).sum(dim=1)
