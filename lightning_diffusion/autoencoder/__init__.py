"""Stage 1: the VAE-GAN autoencoder whose latent space the denoiser works in.

`VAEGAN` is imported on first use, so `lightning_diffusion.autoencoder.losses` (say) loads without Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VAEGAN": "lightning_diffusion.autoencoder.module",
    "DiagonalGaussian": "lightning_diffusion.autoencoder.distributions",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_diffusion.autoencoder' has no attribute '{name}'")
