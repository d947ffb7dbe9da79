"""A small real model and data for the SLURM tests, on the project's dict batches (`image` in [-1, 1], `caption`, `key`).

It stands in for the stage configs so the tests exercise SLURM mechanics (ranks, requeue, resume, W&B ids)
in seconds; `StepMarker` prints progress lines the tests wait for before signalling a job.
"""

from __future__ import annotations

import os
import sys
import time

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset


class PatternImages(Dataset):
    """Deterministic 3-channel sinusoid patterns in [-1, 1] with captions, one per index."""

    def __init__(self, size: int, image_size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.freqs = torch.rand(size, 3, 2, generator=generator) * 3 + 0.5
        self.phases = torch.rand(size, 3, generator=generator) * 6.283
        grid = torch.linspace(0, 6.283, image_size)
        self.yy, self.xx = torch.meshgrid(grid, grid, indexing="ij")

    def __len__(self) -> int:
        return len(self.freqs)

    def __getitem__(self, index: int) -> dict:
        fy, fx = self.freqs[index, :, 0, None, None], self.freqs[index, :, 1, None, None]
        image = torch.sin(fy * self.yy + fx * self.xx + self.phases[index, :, None, None])
        return {"image": image, "caption": f"pattern {index}", "key": f"{index:06d}"}


class PatternData(L.LightningDataModule):
    def __init__(self, size: int = 64, image_size: int = 16, batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        dataset = PatternImages(self.hparams.size, self.hparams.image_size, self.hparams.seed)
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True)


class TinyAutoencoder(L.LightningModule):
    """Conv encoder/decoder trained with an L1 reconstruction loss."""

    def __init__(self, channels: int = 16, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Conv2d(3, channels, 3, 2, 1), nn.SiLU(), nn.Conv2d(channels, 4, 3, 1, 1))
        self.decoder = nn.Sequential(nn.Conv2d(4, channels, 3, 1, 1), nn.SiLU(), nn.Upsample(scale_factor=2),
                                     nn.Conv2d(channels, 3, 3, 1, 1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.l1_loss(self.decoder(self.encoder(batch["image"])), batch["image"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class StepMarker(L.Callback):
    """Prints `[marker] ...` lines (run id, group, start step, every `every` steps) for the tests to read."""

    def __init__(self, every: int = 10) -> None:
        self.every = every

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, f"rank={trainer.global_rank} world={trainer.world_size} node={trainer.node_rank} "
                    f"local_rank={trainer.local_rank}", all_ranks=True)
        experiment = trainer.logger.experiment if trainer.is_global_zero and trainer.logger else None
        self._print(trainer, f"start step={trainer.global_step} run_id={getattr(experiment, 'id', None)} "
                    f"group={getattr(experiment, 'group', None)} lr={pl_module.hparams.lr} "
                    f"channels={pl_module.hparams.channels}")

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step % self.every == 0:
            self._print(trainer, f"step={trainer.global_step}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, f"end step={trainer.global_step}")

    @staticmethod
    def _print(trainer: L.Trainer, text: str, all_ranks: bool = False) -> None:
        if all_ranks or trainer.is_global_zero:
            print(f"[marker] t={time.time():.2f} pid={os.getpid()} {text}", flush=True, file=sys.stdout)
