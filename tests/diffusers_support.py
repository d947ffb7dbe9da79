"""Tiny random diffusers `AutoencoderKL` folders (written by `save_pretrained`, nothing downloaded) for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def tiny_autoencoder_kl(folder: Path, *, scaling_factor: float = 0.5, shift_factor: float | None = None,
                        safe: bool = True, seed: int = 0, quant_conv: bool = True) -> nn.Module:
    """A 2-level (f = 2) AutoencoderKL with 4 latent channels and random non-trivial norms, saved to `folder`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    model.save_pretrained(str(folder), safe_serialization=safe)
    return model.eval()


def images(count: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random images in [-1, 1]."""
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
