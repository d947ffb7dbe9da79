"""Real-data feature statistics (mu, sigma, n; features for KID), computed once and cached on disk.

A FID evaluation spends much of its time encoding the same real images again. The statistics of one
(dataset, split, encoder, resolution, sample count) are saved as a small `.pt` file whose name carries a hash
of the shards' sha256 digests, so changed data never reuses stale statistics. Computing them is DDP-safe: every
rank encodes its own part and torchmetrics sums the moments across ranks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_diffusion.training.checkpoints import load_checkpoint


@dataclass
class RealStatistics:
    """Mean and covariance (float64) of `n` real feature vectors; the vectors themselves when KID needs them."""

    mu: Tensor
    sigma: Tensor
    n: int
    features: Tensor | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (rank 0 only in DDP), so a killed job never leaves a truncated cache file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"mu": self.mu, "sigma": self.sigma, "n": torch.tensor(self.n)}
        if self.features is not None:
            blob["features"] = self.features.float()
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        torch.save(blob, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RealStatistics:
        blob = load_checkpoint(path, what="real-data statistics cache")
        return cls(blob["mu"].double(), blob["sigma"].double(), int(blob["n"]), blob.get("features"))


class FeatureStatistics(Metric):
    """Running first and second moments of feature vectors (float64), summed across ranks on `compute()`."""

    full_state_update = False

    def __init__(self, num_features: int, keep_features: bool = False) -> None:
        super().__init__()
        self.keep_features = keep_features
        self.add_state("feature_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "feature_outer_sum", torch.zeros(num_features, num_features, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("features", [], dist_reduce_fx="cat")

    def update(self, features: Tensor) -> None:
        features = features.double()
        self.feature_sum += features.sum(0)
        self.feature_outer_sum += features.T @ features
        self.count += features.shape[0]
        if self.keep_features:
            self.features.append(features.float())

    def compute(self) -> RealStatistics:
        n = int(self.count)
        if n < 2:
            raise RuntimeError(f"real-data statistics need at least 2 images, got {n}")
        mu = self.feature_sum / n
        sigma = (self.feature_outer_sum - n * torch.outer(mu, mu)) / (n - 1)
        features = dim_zero_cat(self.features) if self.keep_features else None
        return RealStatistics(mu, sigma, n, features)


def shards_digest(shards: Iterable[str]) -> str:
    """sha256 over the sorted shards' own sha256 digests (the URL itself for shards that are not local files)."""
    from lightning_diffusion.metrics.encoders import file_digest

    outer = hashlib.sha256()
    for shard in sorted(shards):
        outer.update((file_digest(shard) if Path(shard).is_file() else shard).encode())
    return outer.hexdigest()


def cache_file(
    cache_dir: str | os.PathLike, *, dataset: str, split: str, encoder: str, resolution: int, num_samples: int,
    digest: str,
) -> Path:
    """`<cache_dir>/<dataset>-<split>-<encoder>-<res>px-n<count>-<digest16>.pt`."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset)
    return Path(cache_dir) / f"{safe}-{split}-{encoder}-{resolution}px-n{num_samples}-{digest[:16]}.pt"


def default_cache_dir() -> Path:
    """`$LIGHTNING_DIFFUSION_CACHE/real_stats`, else `~/.cache/lightning_diffusion/real_stats`."""
    root = os.environ.get("LIGHTNING_DIFFUSION_CACHE") or Path.home() / ".cache" / "lightning_diffusion"
    return Path(root) / "real_stats"


@torch.no_grad()
def compute_real_statistics(
    encode: Callable[[Tensor], Tensor], batches: Iterable[Tensor], num_features: int, num_samples: int,
    keep_features: bool = False,
) -> RealStatistics:
    """Encode up to `num_samples` real images (per rank) from `batches` ([-1, 1] images) and gather the moments."""
    stats = FeatureStatistics(num_features, keep_features)
    seen = 0
    for images in batches:
        images = images[: num_samples - seen]
        features = encode(images)
        stats.update(features.to(stats.feature_sum.device))
        seen += images.shape[0]
        if seen >= num_samples:
            break
    return stats.compute()


def load_or_compute(
    path: str | os.PathLike, compute: Callable[[], RealStatistics], need_features: bool = False
) -> tuple[RealStatistics, bool]:
    """Cached statistics at `path` if usable, else `compute()` them and save (rank 0). Returns (stats, was_cached).

    Ranks agree on the branch first (a file seen by one node only is recomputed by all), so DDP stays in step.
    """
    path = Path(path)
    stats = None
    if path.is_file():
        stats = RealStatistics.load(path)
        if need_features and stats.features is None:
            stats = None
    if _on_every_rank(stats is not None):
        return stats, True
    stats = compute()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        stats.save(path)
    return stats, False


def _on_every_rank(flag: bool) -> bool:
    if not torch.distributed.is_initialized():
        return flag
    flags: list[bool] = [False] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(flags, flag)
    return all(flags)
