"""N-layer PatchGAN discriminator (Isola et al. 2017): one real/fake logit per overlapping image patch."""

from __future__ import annotations

from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """Conv(4, stride 2) stack with `num_layers` down-samplings; receptive field 70 px for 3 layers.

    GroupNorm instead of pix2pix's BatchNorm: real and fake batches pass separately, and batch statistics
    would differ between them (and between DDP ranks).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for index in range(1, num_layers + 1):
            previous, width = width, channels * min(2**index, 8)
            stride = 2 if index < num_layers else 1
            layers += [nn.Conv2d(previous, width, 4, stride, 1, bias=False), nn.GroupNorm(_groups(width), width),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, images: Tensor) -> Tensor:
        """Patch logits `[B, 1, h, w]`."""
        return self.main(images)


def _groups(channels: int) -> int:
    return 32 if channels % 32 == 0 else 1
