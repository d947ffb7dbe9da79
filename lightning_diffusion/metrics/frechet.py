"""FID / KID factories on any `FeatureEncoder`, and a suite that encodes each image once for both.

Conventions kept here so callers cannot get them wrong: images arrive in [-1, 1] and are clamped and mapped to
[0, 1] once; encoders run outside autocast; metric states are float64; `compute()` runs on every rank (the
torchmetrics sync is a collective, so computing on rank 0 only deadlocks).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightning_diffusion.metrics.encoders import FeatureEncoder
from lightning_diffusion.metrics.keys import metric_key
from lightning_diffusion.metrics.real_stats import RealStatistics


def to_unit_range(images: Tensor) -> Tensor:
    """[-1, 1] model images -> float32 [0, 1] (what FID/KID with `normalize=True` expect)."""
    return ((images.float().clamp(-1, 1) + 1) / 2).clamp(0, 1)


def _float64_states(metric: FrechetInceptionDistance | KernelInceptionDistance) -> None:
    """float64 metric states, but keep the encoder in float32 (`set_dtype` would convert it too, and slow it)."""
    metric.set_dtype(torch.float64)
    metric.inception.to(torch.float32)


def make_fid(encoder: nn.Module) -> FrechetInceptionDistance:
    """torchmetrics FID on `encoder` ([0, 1] images -> features, with `num_features`); real states survive reset."""
    fid = FrechetInceptionDistance(feature=encoder, normalize=True, reset_real_features=False)
    _float64_states(fid)
    return fid


def make_kid(encoder: nn.Module, subset_size: int = 1000, subsets: int = 100) -> KernelInceptionDistance:
    """torchmetrics KID (cubic polynomial kernel MMD over random subsets) on `encoder`."""
    kid = KernelInceptionDistance(
        feature=encoder, subsets=subsets, subset_size=subset_size, normalize=True, reset_real_features=False
    )
    _float64_states(kid)
    return kid


class PrecomputedFeatures(nn.Module):
    """Identity 'feature extractor': lets FID and KID share features the suite computed once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features.double()


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sum_over_ranks(value: int) -> int:
    """An integer summed over all ranks (a collective: call it on every rank)."""
    if _rank_and_world()[1] == 1:
        return value
    values: list[int] = [0] * _rank_and_world()[1]
    torch.distributed.all_gather_object(values, value)
    return sum(values)


class FrechetSuite(nn.Module):
    """FID and/or KID of generated images against real ones, in `encoder`'s feature space.

    `update(images, real=...)` takes [-1, 1] images; `load_real(stats)` fills the real side from cached
    statistics instead; `compute(num_samples)` returns `{'fid_inception@5k': ..., 'kid_inception@5k': ...}`
    (`fd_`/`kd_` for other encoders).
    """

    def __init__(
        self, encoder: FeatureEncoder, metrics: tuple[str, ...] = ("fid",), kid_subset_size: int = 1000,
        kid_subsets: int = 100,
    ) -> None:
        super().__init__()
        unknown = set(metrics) - {"fid", "kid"}
        if unknown:
            raise ValueError(f"FrechetSuite computes fid and kid, not {sorted(unknown)}")
        self.encoder = encoder
        features = PrecomputedFeatures(encoder.num_features)
        self.fid = make_fid(features) if "fid" in metrics else None
        self.kid = make_kid(features, kid_subset_size, kid_subsets) if "kid" in metrics else None
        self.kid_subset_size = kid_subset_size
        self._real_count = 0  # real images on this rank (all of them on rank 0 after `load_real`)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """[-1, 1] images -> float64 features, in float32 outside any autocast region."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.encoder(to_unit_range(images)).double()

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        self.update_features(self.encode(images), real)

    def update_features(self, features: Tensor, real: bool) -> None:
        if real:
            self._real_count += features.shape[0]
        for metric in (self.fid, self.kid):
            if metric is not None:
                metric.update(features, real=real)

    def load_real(self, stats: RealStatistics) -> None:
        """Fill the real-side states from statistics, so that the cross-rank sum gives exactly `stats`.

        FID states are sums: rank 0 holds them and other ranks zeros. KID needs the vectors: each rank holds
        a disjoint slice and the cross-rank gather reassembles all of them.
        """
        rank, world = _rank_and_world()
        self._real_count = stats.n if rank == 0 else 0
        if self.fid is not None:
            device = self.fid.real_features_sum.device
            mu, sigma, n = stats.mu.to(device, torch.float64), stats.sigma.to(device, torch.float64), stats.n
            scale = 1.0 if rank == 0 else 0.0
            self.fid.real_features_sum = scale * n * mu
            self.fid.real_features_cov_sum = scale * ((n - 1) * sigma + n * torch.outer(mu, mu))
            self.fid.real_features_num_samples = torch.tensor(n if rank == 0 else 0, device=device)
        if self.kid is not None:
            if stats.features is None:
                raise ValueError("KID needs the real feature vectors: compute the statistics with keep_features")
            self.kid.real_features = [stats.features[rank::world].to(self.encoder_device(), torch.float64)]

    def encoder_device(self) -> torch.device:
        return next(iter(self.encoder.parameters()), torch.empty(0)).device

    def compute(self, num_samples: int, role: str | None = None) -> dict[str, float]:
        """Call on every rank. `num_samples` (generated images, all ranks) names the keys and bounds KID's subsets;
        `role='recon'` names reconstructions (`fd_effnet_recon@500`)."""
        results: dict[str, float] = {}
        name = self.encoder.name
        if self.fid is not None:
            results[metric_key("fid", name, num_samples, role)] = float(self.fid.compute())
        if self.kid is not None:
            real_count = sum_over_ranks(self._real_count)
            self.kid.subset_size = max(2, min(self.kid_subset_size, num_samples, real_count))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # same subsets on every rank
                kid_mean, _ = self.kid.compute()
            results[metric_key("kid", name, num_samples, role)] = float(kid_mean)
        return results

    def reset(self) -> None:
        """Forget generated images; the real side is kept (`reset_real_features=False`)."""
        for metric in (self.fid, self.kid):
            if metric is not None:
                metric.reset()
