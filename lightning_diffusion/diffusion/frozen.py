"""Frozen sub-models of the denoiser (the autoencoder, the text encoder), loaded from their own checkpoints.

They are held outside the module tree on purpose: not in ``parameters()`` (so never in the optimiser or DDP's
gradient buckets), not in the denoiser's ``state_dict`` (their weights already live in their own checkpoints,
which the denoiser's hyper-parameters name), and shared, not copied, by the EMA model's deep copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_diffusion.errors import UserError
from lightning_diffusion.text_encoders.spec import TextEncoderSpec

VAE_FIX = ("train the VAE-GAN first (python -m lightning_diffusion fit --config configs/vae_gan/tiny.yaml) or "
           "point it at a diffusers AutoencoderKL folder")
CLIP_FIX = "train CLIP first: python -m lightning_diffusion fit --config configs/clip/tiny.yaml"


class Frozen:
    """A frozen module (eval mode, no gradients) kept off the owner's module tree; moved to a device on use."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval().requires_grad_(False)

    def on(self, device: torch.device) -> nn.Module:
        """The module, moved to ``device`` the first time it is used there."""
        first = next(iter(self.module.parameters()), None)
        if first is None:
            first = next(iter(self.module.buffers()), None)
        if first is not None and first.device != device:
            self.module.to(device)
        return self.module

    def __deepcopy__(self, memo: dict) -> Frozen:
        return self


def _require_file(path: str | None, key: str, what: str, fix: str, folder_ok: bool = False) -> str:
    if not path:
        raise UserError(f"{key} is not set: this denoiser needs the frozen {what}; {fix}")
    if not (Path(path).is_file() or folder_ok and Path(path).is_dir()):
        raise UserError(f"{key} '{path}' does not exist: {fix}")
    return path


def load_vae(path: str | None) -> nn.Module:
    """The frozen autoencoder of a latent-space denoiser (``model.vae_checkpoint``): a VAE-GAN checkpoint or a
    diffusers ``AutoencoderKL`` folder (see ``lightning_diffusion.autoencoder.frozen_autoencoder``)."""
    path = _require_file(path, "model.vae_checkpoint", "autoencoder", VAE_FIX, folder_ok=True)
    from lightning_diffusion.autoencoder.frozen_autoencoder import load_frozen_autoencoder

    return load_frozen_autoencoder(path, "model.vae_checkpoint")


def load_text_encoder(hparams: Mapping[str, Any]) -> nn.Module:
    """The frozen text encoder a denoiser's hyper-parameters name (``model.text_encoder`` and its paths; see
    ``lightning_diffusion.text_encoders``)."""
    return TextEncoderSpec.from_hparams(hparams).load()
