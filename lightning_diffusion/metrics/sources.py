"""Where an evaluation's inputs come from: real shards in a fixed order, cached real statistics, the project's CLIP.

Shared by the `evaluate` command and the denoiser's in-training `SampleMetrics` callback, so that both score the
same images the same way and hit the same real-statistics cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_diffusion.errors import UserError
from lightning_diffusion.metrics.frechet import FrechetSuite
from lightning_diffusion.metrics.real_stats import RealStatistics


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def real_loader(
    urls: str | Sequence[str], image_size: int, batch_size: int, num_samples: int, num_workers: int = 0,
    seed: int = 0, require_caption: bool = True, key: str = "--data",
) -> Any:
    """Unshuffled full batches of real (image, caption) samples, this rank's contiguous share of the shards.
    `key` names the setting the shards came from in errors (`--data`, `SampleMetrics.data`)."""
    from data_pipelines.datamodule import ShardDataModule
    from data_pipelines.urls import resolve_shards

    batch_size = max(1, min(batch_size, math.ceil(num_samples / world_size())))  # full batches only
    urls = resolve_shards(urls, key)
    data = ShardDataModule(
        train_urls=urls, val_urls=urls, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
        seed=seed, shuffle_buffer=0, require_caption=require_caption, persistent_workers=False,
    )
    data.setup("validate")
    return data.val_dataloader()


def real_statistics(
    suite: FrechetSuite, urls: str | Sequence[str], image_size: int, num_samples: int, device: torch.device | str,
    need_features: bool = False, cache_dir: str | Path | None = None, dataset_name: str | None = None,
    batch_size: int = 32, num_workers: int = 0, key: str = "--data",
) -> tuple[RealStatistics, bool]:
    """The real images' feature statistics in `suite`'s feature space: from the cache, else computed and cached.

    Returns (statistics, was_cached). The cache key holds the dataset, encoder (with its input size), resolution,
    count and a digest of the shards, so changed shards or settings never reuse stale statistics."""
    from data_pipelines.urls import resolve_shards
    from lightning_diffusion.metrics.real_stats import (
        cache_file, compute_real_statistics, default_cache_dir, load_or_compute, shards_digest,
    )

    shards = resolve_shards(urls, key)
    dataset = dataset_name or Path(shards[0]).parent.name or "data"
    encoder = suite.encoder.cache_tag or suite.encoder.name
    path = cache_file(cache_dir or default_cache_dir(), dataset=dataset, split="eval", encoder=encoder,
                      resolution=image_size, num_samples=num_samples, digest=shards_digest(shards))
    per_rank = math.ceil(num_samples / world_size())

    def compute() -> RealStatistics:
        loader = real_loader(shards, image_size, batch_size, num_samples, num_workers, require_caption=False)
        batches = (batch["image"].to(device) for batch in loader)
        return compute_real_statistics(suite.encode, batches, suite.encoder.num_features, per_rank, need_features)

    return load_or_compute(path, compute, need_features)


def project_clip_score(clip_checkpoint: str | None, device: torch.device | str, key: str = "--clip-ckpt") -> Any:
    """`ProjectCLIPScore` with the image and text towers of a checkpoint of the clip stage."""
    from lightning_diffusion.clip import CLIPImageEncoder, CLIPTextEncoder
    from lightning_diffusion.metrics.clip_score import ProjectCLIPScore

    if not clip_checkpoint:
        raise UserError(f"clip_score needs the project's CLIP: pass {key} PATH (a checkpoint of the clip stage)")
    image_tower = CLIPImageEncoder.from_checkpoint(clip_checkpoint).to(device)
    text_tower = CLIPTextEncoder.from_checkpoint(clip_checkpoint).to(device)

    def embed_text(captions: list[str]) -> torch.Tensor:
        return text_tower(text_tower.tokenizer(captions).to(device))[1]

    return ProjectCLIPScore(image_tower, embed_text, encoder_name="clip").to(device)
