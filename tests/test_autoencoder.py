"""VAE-GAN: posterior and loss math against independent references, the discriminator schedule, overfitting,
validation metrics and image grids, reload through `load_frozen`, NaN handling and the latent scale across ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from lightning_diffusion.autoencoder import VAEGAN, DiagonalGaussian, losses
from lightning_diffusion.autoencoder.module import NonFiniteLossError
from lightning_diffusion.errors import UserError

TINY = dict(image_size=16, channels=16, channel_mults=[1, 2], num_blocks=1, latent_channels=4, disc_channels=8,
            disc_layers=2, perceptual="none", effnet_input_size=32, val_frechet=False, image_every_n_steps=0,
            latent_scale_batches=2)


def images(n: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (upsampled noise), easy enough to overfit in a few steps."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="bilinear")


def loader(x: torch.Tensor, repeats: int = 1, batch_size: int = 8) -> DataLoader:
    return DataLoader([{"image": image} for image in x] * repeats, batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Path, max_steps: int, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, precision="32-true",
                   enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                   default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs)


def test_kl_and_sample_match_torch_distributions() -> None:
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    posterior = DiagonalGaussian(mean, logvar)
    q = torch.distributions.Independent(torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), 3)
    p = torch.distributions.Independent(torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean)), 3)
    torch.testing.assert_close(posterior.kl(), torch.distributions.kl_divergence(q, p))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(posterior.sample(torch.Generator().manual_seed(7)), mean + torch.exp(0.5 * logvar) * eps)
    assert torch.equal(posterior.mode(), mean)
    assert DiagonalGaussian(mean, torch.full_like(mean, 100.0)).logvar.max() == 20.0
    assert DiagonalGaussian(mean, torch.full_like(mean, -100.0)).logvar.min() == -30.0


def test_networks_compress_by_f_and_the_decoder_may_be_larger() -> None:
    model = VAEGAN(**{**TINY, "image_size": 32, "channel_mults": [1, 2, 2]}, decoder_channels=24, decoder_num_blocks=2)
    posterior = model.encode(images(2, size=32))
    assert posterior.mean.shape == (2, 4, 8, 8)  # f = 4
    assert model.decode(posterior.mode()).shape == (2, 3, 32, 32)
    assert sum(p.numel() for p in model.decoder.parameters()) > sum(p.numel() for p in model.encoder.parameters())
    with pytest.raises(UserError, match="image_size 31"):
        VAEGAN(**{**TINY, "image_size": 31})


def test_adaptive_weight_is_the_gradient_norm_ratio() -> None:
    model = VAEGAN(**TINY)
    x = images(2)
    x_hat, _ = model(x)
    rec = (x_hat - x).abs().mean()
    gan = losses.generator_loss(model.discriminator(x_hat), "hinge")
    last = model.decoder.conv_out.weight
    rec_grad, = torch.autograd.grad(rec, last, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan, last, retain_graph=True)
    expected = torch.sqrt((rec_grad.double() ** 2).sum()) / (torch.sqrt((gan_grad.double() ** 2).sum()) + 1e-4)
    weight = losses.adaptive_weight(rec, gan, last)
    assert not weight.requires_grad
    torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=0)
    assert losses.adaptive_weight(rec, gan, last, max_weight=1e-3) == pytest.approx(1e-3)


def test_gan_losses_follow_their_formulas() -> None:
    real, fake = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    hinge = 0.5 * (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    torch.testing.assert_close(losses.discriminator_loss(real, fake, "hinge"), hinge)
    sig = torch.sigmoid
    ns = -0.5 * ((0.9 * torch.log(sig(real)) + 0.1 * torch.log(1 - sig(real))).mean() + torch.log(1 - sig(fake)).mean())
    torch.testing.assert_close(losses.discriminator_loss(real, fake, "non_saturating", 0.9), ns)
    torch.testing.assert_close(losses.generator_loss(fake, "non_saturating"), -torch.log(sig(fake)).mean())
    torch.testing.assert_close(losses.generator_loss(fake, "hinge"), -fake.mean())
    with pytest.raises(UserError, match="real_label"):
        VAEGAN(**TINY, real_label=0.9, disc_loss="hinge")


class DiscriminatorWatch(Callback):
    """After every batch: whether the discriminator's weights changed and whether its optimiser holds state."""

    def __init__(self) -> None:
        self.changed: list[bool] = []
        self.stepped: list[bool] = []

    def on_train_start(self, trainer, module) -> None:
        self.before = {k: v.clone() for k, v in module.discriminator.state_dict().items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = module.discriminator.state_dict()
        self.changed.append(any(not torch.equal(self.before[k], now[k]) for k in now))
        self.stepped.append(len(module.optimizers()[1].optimizer.state) > 0)


@pytest.mark.parametrize("disc_loss", ["hinge", "non_saturating"])
def test_discriminator_untouched_before_disc_start_and_trained_after(tmp_path: Path, disc_loss: str) -> None:
    model = VAEGAN(**TINY, disc_start=3, disc_loss=disc_loss, real_label=0.9 if disc_loss == "non_saturating" else 1.0)
    watch = DiscriminatorWatch()
    fit = trainer(tmp_path, max_steps=5, callbacks=[watch])
    fit.fit(model, loader(images(20), batch_size=4))
    assert model.global_step == 5  # one global step per batch: the discriminator's steps are not counted
    assert watch.changed == [False, False, False, True, True]
    assert watch.stepped == [False, False, False, True, True]
    for key in ("train/disc", "train/g", "train/adaptive_weight"):
        assert torch.isfinite(fit.callback_metrics[key]), key


def psnr(model: VAEGAN, x: torch.Tensor) -> float:
    mse = ((model.reconstruct(x) - x) ** 2).mean()
    return float(10 * torch.log10(4.0 / mse))


def test_overfitting_a_fixed_batch_lifts_psnr_and_reloads_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = images(8)
    model = VAEGAN(**TINY, reconstruction="l2", disc_weight=0.0, lr=2e-3)
    untrained = psnr(model, x)
    fit = trainer(tmp_path, max_steps=40)
    fit.fit(model, loader(x, repeats=40))
    trained = psnr(model, x)
    assert trained > untrained + 6.0, (untrained, trained)
    assert model.latent_scale_measured and float(model.latent_scale) != 1.0
    path = tmp_path / "vae.ckpt"
    fit.save_checkpoint(path)
    frozen = VAEGAN.load_frozen(path)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert torch.equal(frozen.reconstruct(x), model.eval().reconstruct(x))
    assert float(frozen.latent_scale) == float(model.latent_scale)


def test_latent_scale_is_one_over_the_std_of_the_last_batches(tmp_path: Path) -> None:
    class Record(Callback):
        def __init__(self) -> None:
            self.latents: list[torch.Tensor] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            state = torch.random.get_rng_state()
            with torch.no_grad():  # the same posterior sample the training step is about to draw
                self.latents.append(module.encode(batch["image"]).sample().double().flatten())
            torch.random.set_rng_state(state)

    record = Record()
    model = VAEGAN(**TINY, disc_start=100)
    trainer(tmp_path, max_steps=3, callbacks=[record]).fit(model, loader(images(12), batch_size=4))
    expected = 1 / torch.cat(record.latents[-2:]).std()  # latent_scale_batches = 2
    assert float(model.latent_scale) == pytest.approx(float(expected), rel=1e-5)


def test_load_frozen_names_a_bad_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        VAEGAN.load_frozen(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": TINY}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="not a VAE-GAN"):
        VAEGAN.load_frozen(tmp_path / "other.ckpt")


def test_validation_logs_metrics_and_saves_grids(tmp_path: Path) -> None:
    model = VAEGAN(**{**TINY, "perceptual": "effnet", "val_frechet": True, "frechet_input_size": 32,
                      "image_every_n_steps": 2, "num_logged_images": 4}, disc_start=1)
    fit = trainer(tmp_path, max_steps=3, val_check_interval=2, limit_val_batches=2)
    fit.fit(model, loader(images(8), batch_size=4), loader(images(8, seed=1), batch_size=4))
    metrics = fit.callback_metrics
    # the encoder input sizes (32 px here, not ImageNet's 224) are in the keys: other feature spaces than evaluate's
    for key in ("val/psnr", "val/ssim", "val/perceptual_effnet32", "val/kl", "val/fd_effnet32_recon@8",
                "train/perceptual_effnet32"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert metrics["val/fd_effnet32_recon@8"] > 0
    assert sorted(p.name for p in (tmp_path / "reconstructions").glob("*.png")) == ["step0000002.png"]
    from PIL import Image

    grid = Image.open(tmp_path / "reconstructions" / "step0000002.png")
    assert grid.mode == "RGB" and grid.size == (4 * 18 + 2, 2 * 18 + 2)  # 4 inputs over 4 reconstructions
    assert all(key.split(".")[0] in ("encoder", "decoder", "discriminator", "latent_scale", "latent_window")
               for key in model.state_dict())


def test_lpips_without_backbone_weights_fails_at_setup(tmp_path: Path) -> None:
    model = VAEGAN(**{**TINY, "perceptual": "lpips_alex"}, torch_home=str(tmp_path))
    with pytest.raises(UserError, match="alexnet-owt-7be5be79.pth"):
        trainer(tmp_path, max_steps=1).fit(model, loader(images(4)))


def test_a_non_finite_loss_stops_training(tmp_path: Path) -> None:
    x = images(4)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite VAE-GAN loss at step 0"):
        trainer(tmp_path, max_steps=2).fit(VAEGAN(**TINY), loader(x, batch_size=4))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_steps_both_networks(tmp_path: Path, precision: str) -> None:
    model = VAEGAN(**TINY, disc_start=2)
    watch = DiscriminatorWatch()
    fit = Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, precision=precision, callbacks=[watch],
                  enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                  default_root_dir=tmp_path)
    fit.fit(model, loader(images(16), batch_size=4))
    assert watch.changed == [False, False, True, True]
    assert all(torch.isfinite(value) for value in fit.callback_metrics.values())
    assert model.latent_scale.dtype == torch.float32 and model.encoder.conv_in.weight.dtype == torch.float32
