"""The latent scale factor of Rombach et al. (2022): diffusion runs on `z * scale` with `scale = 1 / std(z)`, so the
denoiser sees latents of unit variance whatever the autoencoder's KL weight made of them.

`std` is taken over every element of posterior samples (as LDM's `1 / z.flatten().std()`), from running sums so
that ranks can add theirs: `std^2 = E[z^2] - E[z]^2`, in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def latent_moments(z: Tensor) -> Tensor:
    """`[sum z, sum z^2, count]` of one batch of latents, float64 (add these across batches and ranks)."""
    z = z.detach().double()
    return torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), dtype=torch.float64, device=z.device)])


def scale_from_moments(moments: Tensor) -> Tensor:
    """`1 / std` from summed `[sum z, sum z^2, count]` (unbiased variance)."""
    total, squares, count = moments.double().unbind(-1) if moments.dim() == 1 else moments.double().sum(0).unbind(-1)
    if count < 2:
        raise ValueError("the latent scale needs at least two latent values")
    mean = total / count
    variance = (squares - count * mean.pow(2)) / (count - 1)
    return variance.clamp_min(1e-12).rsqrt().float()
