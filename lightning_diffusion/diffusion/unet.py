"""The conditional U-Net (DDPM / ADM / Stable Diffusion lineage), readable top to bottom.

    x (+ upsampled low-res image) -> conv -> [ResBlock (+ Attention)] x depth, Downsample  per level
                                  -> middle: ResBlock, Attention, ResBlock
                                  -> [concat skip, ResBlock (+ Attention)] x (depth + 1), Upsample  per level
                                  -> GroupNorm, SiLU, conv -> prediction (eps, v, x0 or velocity)

Every ResBlock is modulated (FiLM: scale and shift) by one embedding vector: the sinusoidal time embedding through
an MLP, plus a class-label embedding (index ``num_classes`` is the learned null class for classifier-free guidance)
and a projection of the pooled text embedding. Attention blocks at the chosen feature-map sizes self-attend and,
for text models, cross-attend to the text-token states under their padding mask. Residual branches end in
zero-initialised layers, so the network starts as a chain of identities around the skips and predicts zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_diffusion.diffusion.attention import AttentionBlock, group_norm, zero_module
from lightning_diffusion.diffusion.embeddings import TimestepEmbedding


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the second normalisation scaled and shifted by the embedding (FiLM)."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed = nn.Linear(embed_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.embed(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        # norm2's affine folded into the per-sample FiLM: two passes over the feature map instead of three
        weight, bias = self.norm2.weight[:, None, None], self.norm2.bias[:, None, None]
        scale = 1 + scale
        normalized = F.group_norm(h, self.norm2.num_groups, eps=self.norm2.eps)
        h = torch.addcmul(torch.addcmul(shift, bias, scale), normalized, weight * scale)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Sequential):
    """A few blocks run in order; each gets what it needs (the embedding, the text tokens, or nothing)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        for block in self:
            if isinstance(block, ResBlock):
                x = block(x, emb)
            elif isinstance(block, AttentionBlock):
                x = block(x, context, context_mask)
            else:
                x = block(x)
        return x


class UNet(nn.Module):
    """A conditional U-Net; see the module docstring for the shape of the network.

    ``attention_resolutions`` are feature-map sizes (with ``image_size`` the input's size), e.g. ``(16, 8)`` for
    a 32 px input: attention after the first downsampling and the second. The conditioning inputs a model was built
    for are required in :meth:`forward`; the others must stay ``None``.

    Opt-in (the defaults keep existing checkpoints loadable): ``feed_forward`` ends every attention block with a
    GEGLU feed-forward, the layout of Stable Diffusion's transformer blocks; ``channels_last`` keeps weights and
    activations in NHWC memory (on a 2-core AVX-512 CPU a training step ran ~3.5 % faster at base width 72, not
    faster at 64: measure on yours, benchmarks/unet_vs_diffusers.py).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int | None = None,
        image_size: int = 32,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 4,
        dropout: float = 0.0,
        context_dim: int | None = None,
        pooled_dim: int | None = None,
        num_classes: int | None = None,
        lowres_channels: int = 0,
        gradient_checkpointing: bool = False,
        feed_forward: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.num_classes = num_classes
        self.lowres_channels = lowres_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.channels_last = channels_last
        out_channels = out_channels or in_channels
        embed_dim = 4 * base_channels

        self.time_embed = TimestepEmbedding(base_channels, embed_dim)
        self.label_embed = nn.Embedding(num_classes + 1, embed_dim) if num_classes else None
        self.pooled_embed = nn.Linear(pooled_dim, embed_dim) if pooled_dim else None

        def attention(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, num_heads, context_dim, feed_forward)

        self.input_conv = nn.Conv2d(in_channels + lowres_channels, base_channels, 3, padding=1)
        skip_channels = [base_channels]
        channels, resolution = base_channels, image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks: list[nn.Module] = [ResBlock(channels, base_channels * mult, embed_dim, dropout)]
                channels = base_channels * mult
                if resolution in attention_resolutions:
                    blocks.append(attention(channels))
                self.down.append(Stage(*blocks))
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                self.down.append(Stage(Downsample(channels)))
                skip_channels.append(channels)
                resolution //= 2

        self.middle = Stage(
            ResBlock(channels, channels, embed_dim, dropout), attention(channels),
            ResBlock(channels, channels, embed_dim, dropout),
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(num_res_blocks + 1):
                blocks = [ResBlock(channels + skip_channels.pop(), base_channels * mult, embed_dim, dropout)]
                channels = base_channels * mult
                if resolution in attention_resolutions:
                    blocks.append(attention(channels))
                if level != 0 and index == num_res_blocks:
                    blocks.append(Upsample(channels))
                    resolution *= 2
                self.up.append(Stage(*blocks))

        self.out = nn.Sequential(
            group_norm(channels), nn.SiLU(), zero_module(nn.Conv2d(channels, out_channels, 3, padding=1))
        )
        if channels_last:  # conv weights NHWC; `.to(device)` and `load_state_dict` keep the layout
            self.to(memory_format=torch.channels_last)

    def _run(self, stage: Stage, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, h, emb, context, mask, use_reentrant=False)
        return stage(h, emb, context, mask)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
        label: Tensor | None = None,
        lowres: Tensor | None = None,
    ) -> Tensor:
        """Predict from the noisy input ``x [B, C, H, W]`` at (float) timesteps ``t [B]`` under the conditions."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb = self.time_embed(t)
        if self.label_embed is not None:
            if label is None:
                raise ValueError("this U-Net is class-conditioned: pass `label` (index num_classes = null class)")
            emb = emb + self.label_embed(label)
        if self.pooled_embed is not None:
            if pooled is None:
                raise ValueError("this U-Net takes the pooled text embedding: pass `pooled`")
            emb = emb + self.pooled_embed(pooled.to(emb.dtype))
        if self.lowres_channels:
            if lowres is None:
                raise ValueError("this U-Net is conditioned on a low-resolution image: pass `lowres`")
            lowres = F.interpolate(lowres.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, lowres], dim=1)

        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.input_conv(x)
        skips = [h]
        for stage in self.down:
            h = self._run(stage, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle, h, emb, context, context_mask)
        for stage in self.up:
            h = self._run(stage, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h).contiguous()  # the usual layout for the caller, whichever one ran inside
