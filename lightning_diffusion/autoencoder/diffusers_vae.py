"""Pretrained diffusers `AutoencoderKL` folders (the layout `save_pretrained` writes), read offline.

`DiffusersVAE` is such a folder as the denoiser's frozen autoencoder (scale and shift from its config).
`pretrained_networks` gives the VAE-GAN diffusers' own encoder and decoder to fine-tune: the network is diffusers'
class rather than the project's, because Stable Diffusion's VAE has `quant_conv`/`post_quant_conv` layers and a
zero-padded decoder input that the project's network cannot hold exactly, and diffusers' class reproduces every
`AutoencoderKL` configuration (SD, SDXL, ...) as published.

Only local folders: nothing is downloaded (`local_files_only`). Weights load from `safetensors`; a
`diffusion_pytorch_model.bin` pickle is checked by the project's weights-only rule before diffusers reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_diffusion.autoencoder.distributions import DiagonalGaussian
from lightning_diffusion.autoencoder.frozen_autoencoder import WEIGHT_FILES, LatentScaling
from lightning_diffusion.errors import UserError

LAYOUT = ("a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors, as save_pretrained "
          "writes)")


def autoencoder_kl_class() -> type:
    """diffusers' `AutoencoderKL`, imported on first use (a one-line error when diffusers is not installed)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise UserError(f"diffusers is not installed ({err}): pip install 'diffusers>=0.42,<0.43' to use "
                        "AutoencoderKL folders") from err
    return AutoencoderKL


def read_config(folder: str | Path, key: str) -> tuple[dict[str, Any], Path]:
    """The folder's `config.json` and weights file, checked: a `UserError` naming what is missing or wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{key} '{folder}' is not a folder: expected {LAYOUT}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{key} '{folder}' has no config.json: expected {LAYOUT}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{key} '{config_path}' is not readable JSON ({err}): re-download the folder") from err
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise UserError(f"{key} '{config_path}' describes {found!r}, not 'AutoencoderKL': expected {LAYOUT}")
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        raise UserError(f"{key} '{config_path}' sets per-channel latents_mean/latents_std, which this project does "
                        "not apply: use an AutoencoderKL with scaling_factor (and shift_factor) only")
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise UserError(f"{key} '{folder}' has no {' or '.join(WEIGHT_FILES)}: expected {LAYOUT}")
    return config, weights


def load_autoencoder_kl(folder: str | Path, key: str) -> nn.Module:
    """`AutoencoderKL.from_pretrained` of a local folder (never a download), float32, eval mode."""
    from lightning_diffusion.training.checkpoints import check_checkpoint

    _, weights = read_config(folder, key)
    if weights.suffix == ".bin":
        check_checkpoint(weights, what="AutoencoderKL weights", key=key)
    cls = autoencoder_kl_class()
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=weights.suffix != ".bin",
                                    torch_dtype=torch.float32, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        raise UserError(f"{key} '{folder}' could not be loaded as AutoencoderKL ({str(err).splitlines()[0]}): "
                        f"expected {LAYOUT} whose weights match its config.json") from err
    return model.eval()


def plain_config(model: nn.Module) -> dict[str, Any]:
    """An `AutoencoderKL`'s constructor arguments as plain JSON types (a hyper-parameter that loads weights-only)."""
    return json.loads(json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")}))


class KLEncoder(nn.Module):
    """`AutoencoderKL`'s encoder and `quant_conv`: images -> posterior moments (mean and log-variance)."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.encoder = autoencoder.encoder
        self.quant_conv = autoencoder.quant_conv

    def forward(self, x: Tensor) -> Tensor:
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)


class KLDecoder(nn.Module):
    """`AutoencoderKL`'s `post_quant_conv` and decoder: unscaled latents -> images."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv = autoencoder.post_quant_conv
        self.decoder = autoencoder.decoder

    @property
    def conv_out(self) -> nn.Conv2d:
        return self.decoder.conv_out

    def forward(self, z: Tensor) -> Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))


def network_levels(channel_mults: list[int], folder: str | None, config: dict[str, Any] | None) -> int:
    """Resolution levels of a VAE-GAN's network: the kl-f one's, or the pretrained folder's (config.json only)."""
    if config is None and folder:
        config = read_config(folder, "model.pretrained")[0]
    return len(config["block_out_channels"] if config else channel_mults)


def pretrained_networks(folder: str | None, config: dict[str, Any] | None,
                        in_channels: int) -> tuple[KLEncoder, KLDecoder, dict]:
    """Encoder, decoder and config of an `AutoencoderKL` for the VAE-GAN (`model.pretrained`): the folder's weights,
    or, when a checkpoint is reloaded, the architecture of its stored config (`model.pretrained_config`; the weights
    come from the checkpoint, so the folder is not needed)."""
    if config is not None:
        model = autoencoder_kl_class().from_config(config)
    else:
        model = load_autoencoder_kl(folder, key="model.pretrained")
    if model.config.in_channels != in_channels:
        raise UserError(f"model.in_channels {in_channels} differs from the {model.config.in_channels} of "
                        f"model.pretrained {folder}: set model.in_channels: {model.config.in_channels}")
    model.train()  # from_pretrained returns eval mode; the VAE-GAN trains it
    return KLEncoder(model), KLDecoder(model), plain_config(model)


class DiffusersVAE(LatentScaling, nn.Module):
    """A frozen `AutoencoderKL` with the project's autoencoder interface (see `frozen_autoencoder`)."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        config = autoencoder.config
        self.register_buffer("latent_scale", torch.tensor(float(config.scaling_factor)))
        self.latent_shift = float(config.shift_factor or 0.0)
        size = config.sample_size
        self.default_image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.downsampling_factor = 2 ** (len(config.block_out_channels) - 1)

    @classmethod
    def from_folder(cls, folder: str | Path, key: str = "model.vae_checkpoint") -> "DiffusersVAE":
        return cls(load_autoencoder_kl(folder, key)).eval().requires_grad_(False)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        posterior = self.autoencoder.encode(x).latent_dist
        return DiagonalGaussian(posterior.mean, posterior.logvar)

    def decode(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z).sample

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Deterministic reconstruction (posterior mean), clamped to [-1, 1] (what `evaluate` scores)."""
        return self.decode(self.encode(images).mode()).clamp(-1, 1)
