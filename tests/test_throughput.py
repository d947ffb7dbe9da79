"""ThroughputMFU: samples/s and MFU from a FLOP count of one training batch, for the three models (the VAE-GAN's
manual optimisation included), to the loggers and the progress bar, with a given peak on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger
from torch.utils.flop_counter import FlopCounterMode

from lightning_diffusion.autoencoder import VAEGAN
from lightning_diffusion.clip import CLIPModule
from lightning_diffusion.diffusion.module import Denoiser
from lightning_diffusion.errors import UserError
from lightning_diffusion.training.throughput import ThroughputMFU, batch_size
from denoiser_support import TINY_UNET, fixed_batch, loader

PEAK = 1e11  # a made-up CPU peak: MFU must be the measured FLOP/s over it
TINY_VAE = dict(image_size=16, channels=16, channel_mults=[1, 2], num_blocks=1, latent_channels=4, disc_channels=8,
                disc_layers=2, perceptual="none", val_frechet=False, image_every_n_steps=0, disc_start=2)


class CaptureLogger(Logger):
    """Keeps every `log_metrics` call (what W&B would receive)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    name, version = "capture", 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))


def fit(model: Any, data: Any, steps: int, tmp_path: Path, **callback_args: Any) -> tuple[ThroughputMFU, Trainer,
                                                                                        CaptureLogger]:
    monitor, logger = ThroughputMFU(**{"peak_flops": PEAK, "window_size": 2, **callback_args}), CaptureLogger()
    trainer = Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=logger,
                      callbacks=[monitor], log_every_n_steps=1, enable_checkpointing=False, enable_model_summary=False,
                      enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, data)
    return monitor, trainer, logger


def last(logger: CaptureLogger, key: str) -> float:
    values = [m[key] for m in logger.metrics if key in m]
    assert values, f"{key} was never logged: {logger.metrics[-1]}"
    return values[-1]


def check_rates(logger: CaptureLogger, trainer: Trainer, batch: int) -> None:
    samples, batches = last(logger, "train/device/samples_per_sec"), last(logger, "train/device/batches_per_sec")
    assert samples == pytest.approx(batch * batches) and samples > 0
    assert last(logger, "train/device/mfu") == pytest.approx(last(logger, "train/device/flops_per_sec") / PEAK)
    assert {"samples/s", "mfu"} <= set(trainer.progress_bar_metrics)


def test_denoiser_flops_match_an_independent_count_and_mfu_is_flops_over_peak(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Denoiser(conditioning="class", num_classes=4, ema_decay=None, **TINY_UNET)
    batch = fixed_batch(8)
    with FlopCounterMode(display=False) as counter:  # one forward + backward of the U-Net on the same batch shape
        x0 = batch["image"]
        t = torch.zeros(8, dtype=torch.long)
        model.loss_at(x0, torch.randn_like(x0), t, model.make_condition(labels=batch["label"])).backward()
    monitor, trainer, logger = fit(model, loader(batch, 4), 4, tmp_path)
    assert monitor.flops_per_batch == counter.get_total_flops() > 0
    check_rates(logger, trainer, 8)


def test_vae_gan_manual_optimisation_and_its_gan_phase(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader([{"image": image} for image in fixed_batch(16)["image"]], batch_size=4)
    monitor, trainer, logger = fit(VAEGAN(**TINY_VAE), data, 4, tmp_path)
    assert monitor.flops_per_batch > 0
    check_rates(logger, trainer, 4)


def test_clip_and_samples_per_second_without_a_flop_count(tmp_path: Path) -> None:
    torch.manual_seed(0)
    batch = fixed_batch(8)
    model = CLIPModule(model_name="ld-tiny-vit", image_size=16, warmup_steps=1)
    monitor, trainer, logger = fit(model, loader(batch, 3), 3, tmp_path)
    assert monitor.flops_per_batch > 0
    check_rates(logger, trainer, 8)
    _, _, logger = fit(CLIPModule(model_name="ld-tiny-vit", image_size=16), loader(batch, 3), 3, tmp_path,
                       count_flops=False)
    assert last(logger, "train/device/samples_per_sec") > 0
    assert not any("train/device/mfu" in m for m in logger.metrics)


def test_batch_sizes_and_bad_arguments() -> None:
    assert batch_size({"caption": ["a", "b"], "image": torch.zeros(2, 3, 4, 4)}) == 2
    assert batch_size({"key": [], "latent": torch.zeros(5, 4, 2, 2)}) == 5
    assert batch_size((torch.zeros(3, 1), torch.zeros(3))) == 3
    with pytest.raises(UserError, match="peak_flops"):
        ThroughputMFU(peak_flops=0)
    with pytest.raises(ValueError, match="window_size"):
        ThroughputMFU(window_size=1)
