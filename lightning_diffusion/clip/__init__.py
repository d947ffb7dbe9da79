"""CLIP stage: open_clip models trained with CLIP or SigLIP losses, and frozen encoders for the denoiser.

The names below are imported on first use, so `lightning_diffusion.clip.losses` (say) loads without Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CLIPModule": "lightning_diffusion.clip.module",
    "CLIPTextEncoder": "lightning_diffusion.clip.encoders",
    "CLIPImageEncoder": "lightning_diffusion.clip.encoders",
    "MiniLMTextEncoder": "lightning_diffusion.clip.encoders",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_diffusion.clip' has no attribute '{name}'")
