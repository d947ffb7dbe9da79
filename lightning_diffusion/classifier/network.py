"""The noisy-image classifier network: the U-Net's encoder half with a pooling head (ADM's classifier).

    x_t -> conv -> [ResBlock (+ Attention)] x depth, Downsample  per level -> middle: ResBlock, Attention, ResBlock
        -> GroupNorm, SiLU, global average pool, linear -> class logits

Built from ``diffusion/unet.py``'s blocks: every ResBlock is FiLM-modulated by the time embedding, so the classifier
knows how noisy its input is (Dhariwal & Nichol 2021, section 4).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_diffusion.diffusion.attention import AttentionBlock, group_norm
from lightning_diffusion.diffusion.embeddings import TimestepEmbedding
from lightning_diffusion.diffusion.unet import Downsample, ResBlock, Stage


class EncoderClassifier(nn.Module):
    """Class logits for a noisy input ``x_t`` at (float) timesteps ``t``; arguments as :class:`UNet`'s."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        embed_dim = 4 * base_channels
        self.time_embed = TimestepEmbedding(base_channels, embed_dim)
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        channels, resolution = base_channels, image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks: list[nn.Module] = [ResBlock(channels, base_channels * mult, embed_dim, dropout)]
                channels = base_channels * mult
                if resolution in attention_resolutions:
                    blocks.append(AttentionBlock(channels, num_heads, None))
                self.down.append(Stage(*blocks))
            if level != len(channel_mult) - 1:
                self.down.append(Stage(Downsample(channels)))
                resolution //= 2
        self.middle = Stage(ResBlock(channels, channels, embed_dim, dropout), AttentionBlock(channels, num_heads, None),
                            ResBlock(channels, channels, embed_dim, dropout))
        self.head = nn.Sequential(group_norm(channels), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(channels, num_classes))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time_embed(t.float().to(x.device).expand(x.shape[0]))
        h = self.input_conv(x)
        for stage in self.down:
            h = stage(h, emb, None, None)
        return self.head(self.middle(h, emb, None, None))
