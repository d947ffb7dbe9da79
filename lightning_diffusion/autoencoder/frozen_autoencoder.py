"""The frozen autoencoder whose latent space a denoiser works in, behind one small interface: a project VAE-GAN
checkpoint (`.ckpt`) or a diffusers `AutoencoderKL` folder (`config.json` + `diffusion_pytorch_model.safetensors`,
e.g. Stable Diffusion's `sd-vae-ft-ema`).

Diffusion runs on `(z - latent_shift) * latent_scale` of unscaled latents z: diffusers' `shift_factor` and
`scaling_factor` for a folder, the measured `1 / std` (no shift) for a VAE-GAN. Pre-encoded shards record which
autoencoder made them by `autoencoder_sha256` (of the checkpoint file, or over a folder's config and weights).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from lightning_diffusion.autoencoder.distributions import DiagonalGaussian
from lightning_diffusion.errors import UserError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@runtime_checkable
class FrozenAutoencoder(Protocol):
    """What the denoiser, `encode-latents`, `sample` and `evaluate` need of an autoencoder."""

    latent_scale: Tensor
    latent_shift: float

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Images in [-1, 1] -> posterior over unscaled latents."""

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents -> images (about [-1, 1])."""

    def scale_latents(self, z: Tensor) -> Tensor:
        """Unscaled latents -> the diffusion space."""

    def unscale_latents(self, x: Tensor) -> Tensor:
        """The diffusion space -> unscaled latents."""

    @property
    def downsampling_factor(self) -> int:
        """Spatial compression f = H / h."""

    @property
    def default_image_size(self) -> int:
        """The image size the autoencoder was made for."""


class LatentScaling:
    """`(z - latent_shift) * latent_scale` and its inverse, for classes with a `latent_scale` tensor."""

    latent_shift: float = 0.0
    latent_scale: Tensor

    def scale_latents(self, z: Tensor) -> Tensor:
        return (z - self.latent_shift) * self.latent_scale

    def unscale_latents(self, x: Tensor) -> Tensor:
        return x / self.latent_scale + self.latent_shift


def load_frozen_autoencoder(path: str | Path, key: str = "model.vae_checkpoint") -> FrozenAutoencoder:
    """A diffusers `AutoencoderKL` folder or a VAE-GAN checkpoint file, frozen (eval mode, no gradients)."""
    from lightning_diffusion.autoencoder.diffusers_vae import LAYOUT, DiffusersVAE

    if not Path(path).exists():
        raise UserError(f"{key} '{path}' does not exist: check the path, train that stage first (a VAE-GAN .ckpt) "
                        f"or give {LAYOUT}")
    if Path(path).is_dir():
        return DiffusersVAE.from_folder(path, key)
    from lightning_diffusion.autoencoder.module import VAEGAN

    return VAEGAN.load_frozen(path)


def _hash_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def autoencoder_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file; of a diffusers folder, over `config.json` and its weights file (name + bytes)."""
    path = Path(path)
    digest = hashlib.sha256()
    if not path.is_dir():
        _hash_file(digest, path)
        return digest.hexdigest()
    for name in ("config.json", *WEIGHT_FILES):
        if (path / name).is_file():
            digest.update(name.encode() + b"\0")
            _hash_file(digest, path / name)
            if name != "config.json":
                break  # the weights diffusers loads: safetensors first
    return digest.hexdigest()
