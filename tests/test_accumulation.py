"""Gradient accumulation: N batches of B give the gradients and weights of one batch of N*B (denoiser through
Lightning's `accumulate_grad_batches`, the VAE-GAN's manual optimisation through its own), both VAE-GAN optimisers
step every N batches once the GAN is on, and CLIP steps every N batches (its negatives shrink: see
`training/accumulation.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from denoiser_support import TINY_UNET, fixed_batch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from lightning_diffusion.autoencoder import VAEGAN
from lightning_diffusion.clip import CLIPModule
from lightning_diffusion.diffusion.module import Denoiser
from lightning_diffusion.errors import UserError

SAMPLES = 16
TINY_VAE = dict(image_size=16, channels=16, channel_mults=[1, 2], num_blocks=1, latent_channels=4, disc_channels=8,
                disc_layers=2, perceptual="none", val_frechet=False, image_every_n_steps=0, latent_scale_batches=4)


def draws(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


NOISE, TIMES = draws((SAMPLES, 3, 16, 16), 1), torch.randint(0, 1000, (SAMPLES,),
                                                               generator=torch.Generator().manual_seed(2))
LATENT_NOISE = draws((SAMPLES, 4, 8, 8), 3)


class FixedDrawsDenoiser(Denoiser):
    """Each sample's noise and time come from a table (by its `index`), whatever batch it lands in."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        self._index = batch["index"]
        return super().training_step(batch, batch_idx)

    def loss_at(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, condition: Any,
                weighted: bool = True) -> torch.Tensor:
        return super().loss_at(x0, NOISE[self._index], TIMES[self._index], condition, weighted)


class FixedDrawsVAE(VAEGAN):
    """Each sample's posterior draw uses a fixed noise table (by its `index`)."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._index = batch["index"]
        return super().training_step(batch, batch_idx)

    def encode(self, x: torch.Tensor) -> Any:
        posterior = super().encode(x)
        if self.training:
            noise = LATENT_NOISE[self._index]
            posterior.sample = lambda generator=None: posterior.mean + posterior.std * noise
        return posterior


class StepWatch(Callback):
    """The gradients each optimiser sees at every step (after accumulation), and how often each steps."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.steps: dict[int, int] = {}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: Any) -> None:
        self.steps[id(optimizer)] = self.steps.get(id(optimizer), 0) + 1
        if optimizer is trainer.optimizers[0]:
            self.grads.append({name: p.grad.clone() for name, p in pl_module.named_parameters() if p.grad is not None})


def batches(batch_size: int) -> DataLoader:
    data = fixed_batch(SAMPLES)
    samples = [{"image": data["image"][i], "label": data["label"][i], "caption": data["caption"][i], "index": i}
               for i in range(SAMPLES)]
    return DataLoader(samples, batch_size=batch_size, shuffle=False)


def fit(model: Any, batch_size: int, steps: int, tmp_path: Path, **trainer_args: Any) -> StepWatch:
    watch = StepWatch()
    Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False, callbacks=[watch],
            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0,
            num_sanity_val_steps=0, default_root_dir=tmp_path, **trainer_args).fit(model, batches(batch_size))
    return watch


def assert_same_training(a: Any, watch_a: StepWatch, b: Any, watch_b: StepWatch, all_weights: bool = True) -> None:
    assert len(watch_a.grads) == len(watch_b.grads) == 2 and a.global_step == b.global_step == 2
    for grads_a, grads_b in zip(watch_a.grads, watch_b.grads):
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    # Weights (and buffers) after the steps. Unless `all_weights`, only the entries whose gradient is above rounding
    # noise at every step: Adam's normalisation blows a gradient that is 0 up to rounding (a bias right before a
    # one-channel-per-group GroupNorm, the key bias of attention) up to steps of size lr in either direction.
    state_a, state_b = a.state_dict(), b.state_dict()
    compared = total = 0
    for name in state_a:
        kept = torch.ones_like(state_a[name], dtype=torch.bool)
        if not all_weights and name in watch_a.grads[0]:
            kept = torch.stack([g[name].abs() > 1e-6 for g in watch_a.grads]).all(0)
        torch.testing.assert_close(state_b[name][kept], state_a[name][kept], rtol=1e-4, atol=1e-6, msg=name)
        compared, total = compared + int(kept.sum()), total + kept.numel()
    assert compared > 0.9 * total


def test_denoiser_two_batches_of_four_equal_one_batch_of_eight(tmp_path: Path) -> None:
    def build() -> Denoiser:
        torch.manual_seed(0)
        return FixedDrawsDenoiser(conditioning="class", num_classes=4, p_uncond=0.0, ema_decay=None,
                                  warmup_steps=2, weight_decay=0.1, **TINY_UNET)

    whole, accumulated = build(), build()
    watch_whole = fit(whole, 8, 2, tmp_path)
    watch_accumulated = fit(accumulated, 4, 2, tmp_path, accumulate_grad_batches=2)
    assert_same_training(whole, watch_whole, accumulated, watch_accumulated)


def test_vae_gan_two_batches_of_four_equal_one_batch_of_eight(tmp_path: Path) -> None:
    """Before `disc_start`: every term is a batch mean, the latent-scale window sums a step's batches."""
    def build(accumulate: int) -> VAEGAN:
        torch.manual_seed(0)
        return FixedDrawsVAE(accumulate_grad_batches=accumulate, **TINY_VAE)

    whole, accumulated = build(1), build(2)
    watch_whole, watch_accumulated = fit(whole, 8, 2, tmp_path), fit(accumulated, 4, 2, tmp_path)
    assert_same_training(whole, watch_whole, accumulated, watch_accumulated, all_weights=False)
    assert float(accumulated.latent_window[:, 2].sum()) == SAMPLES * 4 * 8 * 8  # every latent counted once


def test_vae_gan_steps_both_optimisers_every_n_batches_in_the_gan_phase(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = VAEGAN(accumulate_grad_batches=3, disc_start=0, **TINY_VAE)
    disc_before = [p.detach().clone() for p in model.discriminator.parameters()]
    watch = fit(model, 2, 2, tmp_path)  # 6 batches of 2
    assert model.global_step == 2
    assert sorted(watch.steps.values()) == [2, 2]  # the autoencoder's and the discriminator's optimiser
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, model.discriminator.parameters()))


def test_vae_gan_steps_at_the_end_of_an_epoch_with_a_partial_window(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = VAEGAN(accumulate_grad_batches=3, **TINY_VAE)
    Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=1, logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=False, default_root_dir=tmp_path).fit(model, batches(4))
    assert model.global_step == 2  # 4 batches: one full window of 3, then the epoch's last batch


def test_clip_steps_every_n_batches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CLIPModule(model_name="ld-tiny-vit", image_size=16, warmup_steps=1)
    watch = fit(model, 4, 2, tmp_path, accumulate_grad_batches=2)
    assert model.global_step == 2 and len(watch.grads) == 2
    assert model.trainer.fit_loop.total_batch_idx + 1 == 4


def test_zero_accumulation_is_a_user_error() -> None:
    with pytest.raises(UserError, match="model.accumulate_grad_batches"):
        VAEGAN(accumulate_grad_batches=0, **TINY_VAE)


def test_vae_gan_a_skipped_batch_leaves_its_whole_window_out(tmp_path: Path) -> None:
    """`nonfinite_loss: skip` with accumulation: a NaN in the first batch of a window drops that window's step (the
    other batch's gradients too), and global_step still counts it."""
    torch.manual_seed(0)
    before = {name: p.detach().clone() for name, p in VAEGAN(**TINY_VAE).named_parameters()}
    image = fixed_batch(4)["image"]
    nan_image = image.clone()
    nan_image[0, 0, 0, 0] = float("nan")
    data = DataLoader([{"image": nan_image}, {"image": image}, {"image": image}, {"image": image}], batch_size=None)
    for steps in (1, 2):
        torch.manual_seed(0)
        model, watch = VAEGAN(accumulate_grad_batches=2, nonfinite_loss="skip", **TINY_VAE), StepWatch()
        Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False, callbacks=[watch],
                enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                default_root_dir=tmp_path).fit(model, data)
        assert model.global_step == steps and watch.grads[0] == {}  # the first step ran with no gradients at all
        unchanged = all(torch.equal(p, before[name]) for name, p in model.named_parameters())
        assert unchanged == (steps == 1)


def test_denoiser_a_skipped_batch_leaves_its_whole_window_out(tmp_path: Path) -> None:
    data = [fixed_batch(4, seed=i) for i in range(4)]
    data[0]["image"][0, 0, 0, 0] = float("nan")  # the first batch of the first window
    for steps in (1, 2):
        torch.manual_seed(0)
        model = Denoiser(conditioning="class", num_classes=4, ema_decay=None, nonfinite_loss="skip", **TINY_UNET)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False,
                accumulate_grad_batches=2, enable_checkpointing=False, enable_model_summary=False,
                enable_progress_bar=False, default_root_dir=tmp_path).fit(model, DataLoader(data, batch_size=None))
        unchanged = all(torch.equal(p, before[name]) for name, p in model.named_parameters())
        assert model.global_step == steps and unchanged == (steps == 1)
