"""Validation metrics of the VAE-GAN: PSNR, SSIM, KL, the perceptual distance and a Fréchet distance of
reconstructions to their inputs on EfficientNet-Lite0 features (named `fd_effnet_recon@<N>`, not FID: the encoder
is not Inception-v3, and the number depends on N).

Metrics take images in [-1, 1] and run in float32 outside autocast. They are kept off the LightningModule's tree
(so the Fréchet encoder's weights never enter checkpoints) and synchronised by torchmetrics across ranks; every
rank must call `compute()`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from lightning_diffusion.metrics.frechet import to_unit_range
from lightning_diffusion.metrics.keys import metric_key


class ReconstructionMetrics:
    """One validation epoch's metrics; `frechet_input_size=None` leaves the Fréchet distance out."""

    def __init__(self, perceptual_name: str | None, frechet_input_size: int | None) -> None:
        self.metrics: dict[str, Metric] = {
            "psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
            "kl": MeanMetric(),
            "rec_l1": MeanMetric(),
        }
        self.perceptual_name = perceptual_name
        if perceptual_name is not None:
            self.metrics[perceptual_name] = MeanMetric()
        self.frechet = None
        if frechet_input_size is not None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            from lightning_diffusion.metrics.encoders import EfficientNetLite0Encoder

            self.frechet = FrechetInceptionDistance(
                feature=EfficientNetLite0Encoder(input_size=frechet_input_size), normalize=True,
                reset_real_features=True,
            )
            self.frechet.set_dtype(torch.float64)
            self.frechet.inception.to(torch.float32)

    def _all(self) -> list[Metric]:
        return list(self.metrics.values()) + ([self.frechet] if self.frechet is not None else [])

    def to(self, device: torch.device) -> "ReconstructionMetrics":
        for metric in self._all():
            metric.to(device)
        return self

    @torch.no_grad()
    def update(self, images: Tensor, reconstructions: Tensor, kl: Tensor, perceptual: Tensor | None) -> None:
        """`kl` and `perceptual` are per-sample values `[B]`."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            real, fake = to_unit_range(images), to_unit_range(reconstructions)
            self.metrics["psnr"].update(fake, real)
            self.metrics["ssim"].update(fake, real)
            self.metrics["kl"].update(kl.float())
            self.metrics["rec_l1"].update((fake - real).abs().mul(2).flatten(1).mean(1))
            if perceptual is not None and self.perceptual_name is not None:
                self.metrics[self.perceptual_name].update(perceptual.float())
            if self.frechet is not None:
                self.frechet.update(real, real=True)
                self.frechet.update(fake, real=False)

    def compute(self) -> dict[str, float]:
        """Metric values keyed without the `val/` prefix; collective under DDP (call on every rank)."""
        values = {name: float(metric.compute()) for name, metric in self.metrics.items()}
        if self.frechet is not None:
            count = int(self.frechet.real_features_num_samples)
            if count >= 2:
                values[metric_key("fid", self.frechet.inception.name, count, role="recon")] = float(self.frechet.compute())
        return values

    def reset(self) -> None:
        for metric in self._all():
            metric.reset()
