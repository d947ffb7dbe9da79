"""Pieces of `test_scale_out.py`: keyed-noise subclasses of the denoiser and the VAE-GAN, their fixed global batches,
one-fit recorders, and the worker that runs both fits as rank `r` of a 2-process `strategy="ddp"` world.

Why keyed noise: both modules draw their training noise from the global RNG (`torch.randn_like`, `torch.randint`,
`DiagonalGaussian.sample`), so sample i of the global batch gets different noise on rank 1 of a 2-rank run than
at row i of a 1-process run. The subclasses below draw each sample's noise (and timestep) from a generator seeded
by the sample's `key` instead, and step with plain SGD: Adam's first step, lr * g / (|g| + eps), turns float
rounding in the near-zero gradients of zero-initialised branches into parameter differences of up to lr, so it
cannot compare parameters at 1e-5. Everything else (conditions, loss, logging, manual optimisation, DDP) is the
modules' own.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from denoiser_support import TINY_UNET, ToyTextEncoder, fixed_batch
from lightning_diffusion.autoencoder import VAEGAN, DiagonalGaussian
from lightning_diffusion.diffusion.module import Denoiser

GLOBAL_BATCH, STEPS, SGD_LR = 8, 2, 0.1
TINY_VAE = dict(image_size=16, channels=16, channel_mults=[1, 2], num_blocks=1, latent_channels=4, disc_channels=8,
                disc_layers=2, perceptual="none", val_frechet=False, image_every_n_steps=0, latent_scale_batches=2,
                disc_start=1, disc_weight=0.5, lr=1e-3)  # step 0 without the GAN terms, step 1 with them
DENOISER = dict(TINY_UNET, conditioning="text", p_uncond=0.0, ema_decay=None, lr=1e-3, seed=0)


def keyed_generator(key: str, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(salt * 1_000_003 + int(key))


class KeyedNoiseDenoiser(Denoiser):
    """`Denoiser` whose training noise and timestep of each sample come from a generator seeded by its `key`."""

    _keys: list[str] | None = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self._keys = list(batch["key"])
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self._keys = None

    def loss_at(self, x0: Tensor, noise: Tensor, t: Tensor, condition: dict, weighted: bool = True) -> Tensor:
        if self._keys is not None:  # replace the global-RNG draws of training_step
            generators = [keyed_generator(key, 1) for key in self._keys]
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(x0)
            t = torch.cat([torch.randint(0, self.schedule.num_timesteps, (1,), generator=g) for g in generators])
            t = t.to(self.device)
        return super().loss_at(x0, noise, t, condition, weighted)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=SGD_LR)


class KeyedGaussian(DiagonalGaussian):
    """A posterior whose reparameterisation noise of each sample is seeded by the sample's key."""

    def __init__(self, mean: Tensor, logvar: Tensor, keys: list[str]) -> None:
        super().__init__(mean, logvar)
        self.keys = keys

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.stack([torch.randn(self.mean.shape[1:], generator=keyed_generator(k, 2)) for k in self.keys])
        return self.mean + self.std * eps.to(self.mean)


class KeyedNoiseVAEGAN(VAEGAN):
    """`VAEGAN` whose training posterior samples use per-key noise (see `KeyedGaussian`)."""

    _keys: list[str] | None = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._keys = list(batch["key"])
        try:
            super().training_step(batch, batch_idx)
        finally:
            self._keys = None

    def encode(self, x: Tensor) -> DiagonalGaussian:
        posterior = super().encode(x)
        return posterior if self._keys is None else KeyedGaussian(posterior.mean, posterior.logvar, self._keys)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        autoencoder = list(self.encoder.parameters()) + list(self.decoder.parameters())
        return [torch.optim.SGD(autoencoder, lr=SGD_LR), torch.optim.SGD(self.discriminator.parameters(), lr=SGD_LR)]


# ----------------------------------------------------------------------------------------- data
def denoiser_batches() -> list[dict[str, Any]]:
    """STEPS global batches of GLOBAL_BATCH captioned 16 px images; keys unique over all steps."""
    batches = []
    for step in range(STEPS):
        batch = fixed_batch(GLOBAL_BATCH, seed=step)
        batch["key"] = [str(step * GLOBAL_BATCH + i) for i in range(GLOBAL_BATCH)]
        batches.append(batch)
    return batches


def vae_batches() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(3)
    batches = []
    for step in range(STEPS):
        image = F.interpolate(torch.rand(GLOBAL_BATCH, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
        batches.append({"image": image, "key": [str(step * GLOBAL_BATCH + i) for i in range(GLOBAL_BATCH)]})
    return batches


def rows(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    return {key: value[start:stop] for key, value in batch.items()}


def rank_share(batches: list[dict[str, Any]], rank: int, world: int) -> list[dict[str, Any]]:
    """Rank r's contiguous 1/world of every global batch (rank order = row order of the global batch)."""
    per_rank = GLOBAL_BATCH // world
    return [rows(batch, rank * per_rank, (rank + 1) * per_rank) for batch in batches]


# ----------------------------------------------------------------------------------------- fits
def flat(tensors: Iterator[Tensor]) -> Tensor:
    return torch.cat([t.detach().flatten().double() for t in tensors])


class Recorder(pl.Callback):
    """Per step: the gradients the first optimiser is about to apply (after DDP's all-reduce), the training loss
    this rank returned (automatic optimisation) and all parameters after the step."""

    def __init__(self) -> None:
        self.grads: list[Tensor] = []
        self.losses: list[float] = []
        self.params: list[Tensor] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        if optimizer is trainer.optimizers[0]:
            self.grads.append(flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()))

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if outputs and "loss" in outputs:  # automatic optimisation
            self.losses.append(float(outputs["loss"]))
        self.params.append(flat(module.parameters()))

    def result(self) -> dict[str, Any]:
        return {"grads": self.grads, "losses": self.losses, "params": self.params}


@contextlib.contextmanager
def toy_text_encoder() -> Iterator[None]:
    import lightning_diffusion.diffusion.module as module

    original = module.load_text_encoder
    module.load_text_encoder = lambda hparams: ToyTextEncoder()
    try:
        yield
    finally:
        module.load_text_encoder = original


def fit(model: pl.LightningModule, batches: list[dict[str, Any]], root: Path, devices: int) -> dict[str, Any]:
    recorder = Recorder()
    strategy = "ddp" if devices > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=len(batches),
                         precision="32-true", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
                         limit_val_batches=0, use_distributed_sampler=False, callbacks=[recorder])
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return recorder.result()


def fit_denoiser(batches: list[dict[str, Any]], root: Path, devices: int = 1) -> dict[str, Any]:
    torch.manual_seed(0)  # the same initial weights in every process
    with toy_text_encoder():
        model = KeyedNoiseDenoiser(**DENOISER)
    return fit(model, batches, root, devices)


def fit_vae(batches: list[dict[str, Any]], root: Path, devices: int = 1) -> dict[str, Any]:
    torch.manual_seed(0)
    return fit(KeyedNoiseVAEGAN(**TINY_VAE), batches, root, devices)


def ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank `rank` of a `strategy="ddp"` world started by `torch.multiprocessing` (spawn): the environment tells
    Lightning the processes exist already, so it neither launches more nor re-runs a script."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    torch.set_num_threads(1)
    root = Path(out_dir)
    result = {"denoiser": fit_denoiser(rank_share(denoiser_batches(), rank, world), root / "denoiser", world),
              "vae": fit_vae(rank_share(vae_batches(), rank, world), root / "vae", world)}
    torch.save(result, root / f"rank{rank}.pt")
