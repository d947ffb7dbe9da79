"""Convolutional encoder and decoder of the VAE (the LDM "kl-f" family): ResNet blocks with GroupNorm and SiLU,
strided-conv down-sampling, nearest-neighbour up-sampling, an optional self-attention block in the middle.

Spatial compression f = 2 ** (len(channel_mults) - 1). The decoder mirrors the encoder and may be wider
(`decoder_channels`) or deeper (`decoder_blocks`). `downsample_padding="asymmetric"` pads (0, 1, 0, 1) before each
stride-2 convolution as LDM and diffusers' `AutoencoderKL` do (needed to export to diffusers); "symmetric" pads 1.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels) if channels % min(32, channels) == 0 else 1, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.block = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.block(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions (pre-norm, residual)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


DownsamplePadding = Literal["symmetric", "asymmetric"]


class AsymmetricDownsample(nn.Conv2d):
    """Stride-2 3x3 convolution after zero padding right and bottom only (LDM's / diffusers' `Downsample2D`)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)))


def downsample(channels: int, padding: DownsamplePadding) -> nn.Conv2d:
    if padding == "asymmetric":
        return AsymmetricDownsample(channels)
    return nn.Conv2d(channels, channels, 3, stride=2, padding=1)


def _mid(channels: int, attention: bool, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [ResnetBlock(channels, channels, dropout)]
    if attention:
        layers.append(SelfAttention(channels))
    layers.append(ResnetBlock(channels, channels, dropout))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Image `[B, in, H, W]` -> posterior moments `[B, 2 * latent, H/f, W/f]` (mean and log-variance)."""

    def __init__(self, in_channels: int, channels: int, channel_mults: Sequence[int], num_blocks: int,
                 latent_channels: int, mid_attention: bool = True, dropout: float = 0.0,
                 downsample_padding: DownsamplePadding = "symmetric") -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        layers: list[nn.Module] = []
        width = channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_blocks):
                layers.append(ResnetBlock(width, channels * mult, dropout))
                width = channels * mult
            if level < len(channel_mults) - 1:
                layers.append(downsample(width, downsample_padding))
        self.down = nn.Sequential(*layers)
        self.mid = _mid(width, mid_attention, dropout)
        self.out = nn.Sequential(group_norm(width), nn.SiLU(), nn.Conv2d(width, 2 * latent_channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.mid(self.down(self.conv_in(x))))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """Latent `[B, latent, h, w]` -> image `[B, out, h*f, w*f]`; `conv_out` is the layer the GAN weight uses."""

    def __init__(self, out_channels: int, channels: int, channel_mults: Sequence[int], num_blocks: int,
                 latent_channels: int, mid_attention: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        width = channels * channel_mults[-1]
        self.conv_in = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.mid = _mid(width, mid_attention, dropout)
        layers: list[nn.Module] = []
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_blocks):
                layers.append(ResnetBlock(width, channels * mult, dropout))
                width = channels * mult
            if level > 0:
                layers.append(Upsample(width))
        self.up = nn.Sequential(*layers)
        self.norm_out = nn.Sequential(group_norm(width), nn.SiLU())
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(self.norm_out(self.up(self.mid(self.conv_in(z)))))
