"""`VAEGAN`: the stage-1 autoencoder (KL-regularised VAE with a PatchGAN, Esser et al. 2021 / Rombach et al. 2022).

Loss of the autoencoder, every term a per-pixel mean (LDM's sums divided by C*H*W):
`rec (L1/L2) + perceptual_weight * d_perc + kl_weight * KL / (C*H*W) + lambda * disc_weight * L_G`, where
`lambda = ||grad_last (rec + perc)|| / (||grad_last L_G|| + 1e-4)` (clamped to [0, 1e4], detached) at the decoder's
last layer; the GAN terms exist only from `disc_start` on (before, the discriminator is neither run nor stepped).

Optimisation is manual with two Adam optimisers but one backward pass of `L_autoencoder + L_disc`: the
discriminator's parameters are frozen while it scores reconstructions for `L_G`, and `L_disc` sees detached
reconstructions, so each loss reaches only its own network. One backward per step keeps DDP's reducer happy with
the default `find_unused_parameters=False`: before `disc_start` the discriminator's parameters enter the graph with
weight zero, so they are reduced (as zeros) but never stepped. The discriminator's step is not counted in
`global_step`, which counts the autoencoder's steps (`max_steps`, `disc_start`). Under `16-mixed` Lightning
updates the loss scale after each optimiser step, so the second step of a step where the scale changed sees
gradients off by the factor 2 (Adam barely notices); `bf16-mixed` has no scale and is the preset.

`accumulate_grad_batches: N` (the model's own: Lightning's is for automatic optimisation) steps both optimisers
every N batches (`training/accumulation.py`); the latent-scale window's slots are steps. N batches of B give the
gradients of one batch of N*B except for `lambda` (per batch, as per rank under DDP) and the discriminator's
batch norm.

`latent_scale` (a buffer, saved in checkpoints) is `1 / std` of the posterior samples over the last
`latent_scale_batches` training batches of all ranks, updated every step: any checkpoint, the final one included,
carries the scale of its own encoder. `measure_latent_scale(loader, n)` re-measures it on chosen data.

`pretrained: folder` fine-tunes a diffusers `AutoencoderKL` (see `diffusers_vae`; the network arguments then do not
apply); `train_encoder: false` trains the decoder only and keeps the folder's scaling_factor/shift_factor.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from lightning_diffusion.autoencoder.discriminator import PatchDiscriminator
from lightning_diffusion.autoencoder.diffusers_vae import network_levels, pretrained_networks
from lightning_diffusion.autoencoder.distributions import DiagonalGaussian
from lightning_diffusion.autoencoder.frozen_autoencoder import LatentScaling
from lightning_diffusion.autoencoder.latent_scale import latent_moments, scale_from_moments
from lightning_diffusion.autoencoder.losses import (
    GANLoss, adaptive_weight, discriminator_loss, generator_loss, reconstruction_loss,
)
from lightning_diffusion.autoencoder.networks import Decoder, DownsamplePadding, Encoder
from lightning_diffusion.autoencoder.perceptual import PerceptualName, check_perceptual, log_name, make_perceptual
from lightning_diffusion.autoencoder.validation import ReconstructionMetrics
from lightning_diffusion.errors import UserError, check_betas, check_fraction, check_positive
from lightning_diffusion.training.accumulation import ManualAccumulation
from lightning_diffusion.training.compile import maybe_compile
from lightning_diffusion.training.nonfinite import NonFiniteLossError  # noqa: F401 - re-exported (raised by training_step)
from lightning_diffusion.training.nonfinite import NonFiniteGuard, NonFiniteMode, check_finite_weights


def _check_sizes(args: dict[str, Any]) -> None:
    """Sizes, counts and learning rates must be positive: a zero or negative one fails deep inside torch."""
    for key, example in (("image_size", 32), ("in_channels", 3), ("channels", 64), ("num_blocks", 1),
                         ("latent_channels", 4), ("disc_layers", 3), ("disc_channels", 64),
                         ("latent_scale_batches", 100), ("effnet_input_size", 224), ("frechet_input_size", 224),
                         ("accumulate_grad_batches", 2)):
        check_positive(f"model.{key}", args[key], example)
    for key, example in (("decoder_channels", 64), ("decoder_num_blocks", 1)):
        check_positive(f"model.{key}", args[key], example, optional=True)
    for key, example in (("lr", 1e-4), ("disc_lr", 1e-4)):
        check_positive(f"model.{key}", args[key], example, integer=False, optional=key == "disc_lr")
    check_betas("model.betas", args["betas"], "[0.5, 0.9]")
    check_fraction("model.dropout", args["dropout"], 0.1)
    mults = args["channel_mults"]
    if not mults or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mults):
        raise UserError(f"model.channel_mults must be a non-empty list of positive integers, got {mults!r}; "
                        "set e.g. model.channel_mults: [1, 2, 2]")


@contextlib.contextmanager
def _own_hyperparameters() -> Iterator[None]:
    """Build a module with its own `hparams`: inside a constructor that LightningCLI runs (the denoiser loading
    its frozen VAE-GAN), `save_hyperparameters` would otherwise store the outer model's config."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    token = _given_hyperparameters.set(None)
    try:
        yield
    finally:
        _given_hyperparameters.reset(token)


class VAEGAN(LatentScaling, LightningModule):
    """Encoder -> diagonal Gaussian posterior -> decoder, trained with reconstruction, perceptual, KL and GAN losses."""

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        channels: int = 64,
        channel_mults: list[int] = [1, 2, 2],  # noqa: B006 - plain list for LightningCLI / hparams
        num_blocks: int = 1,
        latent_channels: int = 4,
        decoder_channels: int | None = None,
        decoder_num_blocks: int | None = None,
        mid_attention: bool = True,
        dropout: float = 0.0,
        downsample_padding: DownsamplePadding = "symmetric",
        pretrained: str | None = None,
        pretrained_config: dict[str, Any] | None = None,
        train_encoder: bool = True,
        reconstruction: Literal["l1", "l2"] = "l1",
        perceptual: PerceptualName = "effnet",
        perceptual_weight: float = 1.0,
        torch_home: str | None = None,
        effnet_input_size: int = 224,
        kl_weight: float = 1e-6,
        disc_start: int = 50_001,
        disc_weight: float = 0.5,
        disc_loss: GANLoss = "hinge",
        disc_layers: int = 3,
        disc_channels: int = 64,
        real_label: float = 1.0,
        lr: float = 1e-4,
        disc_lr: float | None = None,
        betas: tuple[float, float] = (0.5, 0.9),
        grad_clip: float = 0.0,
        latent_scale_batches: int = 100,
        val_frechet: bool = True,
        frechet_input_size: int = 224,
        image_every_n_steps: int = 500,
        num_logged_images: int = 8,
        nonfinite_loss: NonFiniteMode = "stop",
        max_nonfinite_skips: int = 10,
        accumulate_grad_batches: int = 1,
        compile: bool = False,  # noqa: A002 - the config key users expect
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
    ) -> None:
        _check_sizes(locals())  # the arguments: self.hparams may be another model's (docs/gotchas.md)
        super().__init__()
        self.save_hyperparameters()
        check_perceptual(perceptual)
        factor = 2 ** (network_levels(channel_mults, pretrained, pretrained_config) - 1)
        if image_size % factor:
            raise UserError(f"model.image_size {image_size} is not divisible by the downsampling factor {factor} of "
                            f"the network (model.channel_mults or model.pretrained): use a multiple of {factor} (e.g. "
                            f"{max(factor, image_size // factor * factor)})")
        if disc_loss == "hinge" and real_label != 1.0:
            raise UserError("model.real_label (one-sided label smoothing) needs model.disc_loss: non_saturating")
        self.automatic_optimization = False
        self.nonfinite = NonFiniteGuard(nonfinite_loss, max_nonfinite_skips, "VAE-GAN",
                                        "lower model.lr or set model.grad_clip, use bf16-mixed rather than 16-mixed")
        if pretrained or pretrained_config:  # diffusers' AutoencoderKL network and weights (see the module doc)
            self.encoder, self.decoder, self.hparams["pretrained_config"] = pretrained_networks(
                pretrained, pretrained_config, in_channels)
        else:
            self.encoder = Encoder(in_channels, channels, channel_mults, num_blocks, latent_channels, mid_attention,
                                   dropout, downsample_padding)
            self.decoder = Decoder(in_channels, decoder_channels or channels, channel_mults,
                                   decoder_num_blocks or num_blocks, latent_channels, mid_attention, dropout)
        self.discriminator = PatchDiscriminator(in_channels, disc_channels, disc_layers)
        maybe_compile(compile, [self.encoder, self.decoder, self.discriminator], compile_backend, compile_mode)
        self.accumulation = ManualAccumulation(accumulate_grad_batches)
        self.register_buffer("latent_scale", torch.tensor(1.0))
        # per training step [sum z, sum z^2, count] over all ranks, a ring of the last `latent_scale_batches` steps
        self.register_buffer("latent_window", torch.zeros(latent_scale_batches, 3, dtype=torch.float64))
        self.encoder.requires_grad_(train_encoder)
        config = self.hparams.get("pretrained_config")
        self.fixed_scale = bool(config) and not train_encoder  # the folder's latent space: keep its published scale
        if self.fixed_scale:
            self.latent_scale.fill_(float(config["scaling_factor"]))
            self.latent_shift = float(config.get("shift_factor") or 0.0)
        self._perceptual: list[torch.nn.Module | None] = []  # a list keeps the frozen network off the module tree
        self._val_metrics: ReconstructionMetrics | None = None
        self._val_images: tuple[Tensor, Tensor] | None = None
        self._images_logged_at = -1

    # ----- the autoencoder API the denoiser and `evaluate` use -----
    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Images in [-1, 1] -> posterior q(z | x) over unscaled latents `[B, latent_channels, H/f, W/f]`."""
        return DiagonalGaussian.from_moments(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents -> images (about [-1, 1]; not clamped)."""
        return self.decoder(z)

    def forward(self, x: Tensor, sample: bool = True) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample() if sample else posterior.mode()), posterior

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Deterministic reconstruction (posterior mode), clamped to [-1, 1]."""
        return self.decode(self.encode(images).mode()).clamp(-1, 1)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (network_levels(self.hparams.channel_mults, None, self.hparams.get("pretrained_config")) - 1)

    @property
    def default_image_size(self) -> int:
        return int(self.hparams.image_size)

    @property
    def latent_scale_measured(self) -> bool:
        return self.fixed_scale or bool(self.latent_window[:, 2].sum() > 0)

    @classmethod
    def load_frozen(cls, path: str | Path) -> "VAEGAN":
        """The autoencoder of a checkpoint, in eval mode with gradients off (weights_only loading)."""
        from lightning_diffusion.training.checkpoints import check_checkpoint_class, load_checkpoint

        checkpoint = load_checkpoint(path, what="VAE-GAN checkpoint", key="model.vae_checkpoint")
        check_checkpoint_class(checkpoint, "VAE-GAN", path=path, key="model.vae_checkpoint")
        hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
        hparams["compile"] = False  # a training option: a frozen autoencoder runs eager
        try:
            with _own_hyperparameters():
                model = cls(**hparams)
            model.load_state_dict(checkpoint["state_dict"], strict=True)
        except (TypeError, KeyError, RuntimeError) as err:
            raise UserError(f"'{path}' is not a VAE-GAN checkpoint ({str(err).splitlines()[0]}): point "
                            "model.vae_checkpoint at a checkpoint of the vae_gan stage or an AutoencoderKL "
                            "folder") from err
        if not model.latent_scale_measured:
            warnings.warn(f"VAE-GAN checkpoint '{path}' has no measured latent_scale (it was saved before any "
                          "training step); using 1.0. Call measure_latent_scale(loader, num_batches) to set it.",
                          stacklevel=2)
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def measure_latent_scale(self, dataloader: Any, num_batches: int) -> float:
        """Set `latent_scale = 1 / std` of posterior samples over `num_batches` batches (summed over ranks)."""
        moments = torch.zeros(3, dtype=torch.float64, device=self.device)
        for index, batch in enumerate(dataloader):
            if index >= num_batches:
                break
            images = (batch["image"] if isinstance(batch, dict) else batch).to(self.device)
            moments += latent_moments(self.encode(images).sample())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(moments)
        self.latent_window.zero_()
        self.latent_window[0] = moments
        self.latent_scale.fill_(scale_from_moments(moments).item())
        return float(self.latent_scale)

    # ----- training -----
    @property
    def last_layer(self) -> torch.nn.Parameter:
        return self.decoder.conv_out.weight

    def perceptual_net(self) -> torch.nn.Module | None:
        """The frozen perceptual network, built on first use (checkpoints and `load_frozen` never need it)."""
        if not self._perceptual:
            self._perceptual.append(make_perceptual(self.hparams.perceptual, self.hparams.torch_home,
                                                    self.hparams.effnet_input_size))
        net = self._perceptual[0]
        if net is not None and next(net.parameters()).device != self.device:
            net.to(self.device)
        return net

    def gan_active(self) -> bool:
        return self.hparams.disc_weight > 0 and self.global_step >= self.hparams.disc_start

    def autoencoder_terms(self, x: Tensor, x_hat: Tensor, posterior: DiagonalGaussian) -> dict[str, Tensor]:
        """Batch means of the reconstruction (per pixel), perceptual and KL (summed over latent dimensions) terms."""
        terms = {"rec": reconstruction_loss(x, x_hat, self.hparams.reconstruction).mean()}
        net = self.perceptual_net() if self.hparams.perceptual_weight > 0 else None
        if net is not None:
            terms["perceptual"] = net(x_hat.float(), x.float()).mean()
        terms["kl"] = posterior.kl().mean()
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # The adaptive weight's autograd.grad keeps the graph for the backward: compiled (AOT) backwards must not
        # donate (reuse) their saved buffers, which torch decides when it compiles a graph, here on the first step.
        with torch._functorch.config.patch(donated_buffer=False):
            self._training_step(batch, batch_idx)

    def _training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.nonfinite.remember_norm_stats(self)
        opt_ae, opt_disc = self.optimizers()
        x = batch["image"]
        posterior = self.encode(x)
        z = posterior.sample()
        x_hat = self.decode(z)
        terms = self.autoencoder_terms(x, x_hat, posterior)
        nll = terms["rec"] + self.hparams.perceptual_weight * terms.get("perceptual", 0.0)
        loss_ae = nll + self.hparams.kl_weight * terms["kl"] / x[0].numel()
        gan = self.gan_active()
        if gan:
            self.discriminator.requires_grad_(False)
            terms["g"] = generator_loss(self.discriminator(x_hat), self.hparams.disc_loss)
            self.discriminator.requires_grad_(True)
            terms["adaptive_weight"] = adaptive_weight(nll, terms["g"], self.last_layer)
            loss_ae = loss_ae + terms["adaptive_weight"] * self.hparams.disc_weight * terms["g"]
            real, fake = self.discriminator(x.detach()), self.discriminator(x_hat.detach())
            terms["disc"] = discriminator_loss(real, fake, self.hparams.disc_loss, self.hparams.real_label)
            terms["logits_real"], terms["logits_fake"] = real.detach().mean(), fake.detach().mean()
            total = loss_ae + terms["disc"]
        else:  # zero-weighted: the discriminator's gradients exist (DDP reduces every parameter) but stay zero
            total = loss_ae + 0.0 * sum(p.sum() for p in self.discriminator.parameters())
        terms["loss"] = loss_ae
        skip = self._check_finite_and_track_latents(terms, z, first=self.accumulation.starts(batch_idx))
        self.nonfinite.log_count(self, x.shape[0])
        if self.accumulation.backward(self, total, skip):
            self._log_terms(terms, x.shape[0])
        if self.accumulation.ends(self, batch_idx):
            self.accumulation.step(self, opt_ae, [opt_disc], step_others=gan)

    def _log_terms(self, terms: dict[str, Tensor], batch_size: int) -> None:
        self.log_dict({f"train/{name}": value.detach() for name, value in self._named(terms).items()},
                      prog_bar=False, batch_size=batch_size)
        self.log("train/latent_scale", self.latent_scale, batch_size=batch_size)

    def _named(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        named = dict(terms)
        if "perceptual" in named:
            named[log_name(self.hparams.perceptual, self.hparams.effnet_input_size)] = named.pop("perceptual")
        return named

    def _check_finite_and_track_latents(self, terms: dict[str, Tensor], z: Tensor, first: bool = True) -> bool:
        """One small all-reduce: this batch's latent moments and whether any rank's loss is non-finite.

        True when the step is to be skipped (`model.nonfinite_loss: skip`); raises `NonFiniteLossError` to stop.
        The moments of an accumulation window's batches add up in one slot (`first`: the window's first batch)."""
        finite = torch.stack([value.detach().float() for value in terms.values()]).isfinite().all()
        stats = torch.cat([latent_moments(z), (~finite).double().reshape(1)])
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        values = ", ".join(f"{name}={float(value):.4g}" for name, value in terms.items()) if stats[3] > 0 else ""
        if self.nonfinite.skip_step(float(stats[3]), self.global_step, values):
            return True
        slot = self.global_step % self.latent_window.shape[0]
        self.latent_window[slot] = stats[:3] if first else self.latent_window[slot] + stats[:3]
        if not self.fixed_scale:
            self.latent_scale.fill_(scale_from_moments(self.latent_window).item())
        return False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite_weights(checkpoint, "VAE-GAN", self.global_step)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip after the loss scale is removed (Lightning calls this after unscaling under 16-mixed)."""
        if self.hparams.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = tuple(self.hparams.betas)
        autoencoder = [p for p in [*self.encoder.parameters(), *self.decoder.parameters()] if p.requires_grad]
        return [
            torch.optim.Adam(autoencoder, lr=self.hparams.lr, betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.disc_lr or self.hparams.lr, betas=betas),
        ]

    # ----- validation -----
    def on_validation_epoch_start(self) -> None:
        if self._val_metrics is None:
            name = log_name(self.hparams.perceptual, self.hparams.effnet_input_size) if self.hparams.perceptual != "none" else None
            size = self.hparams.frechet_input_size if self.hparams.val_frechet else None
            self._val_metrics = ReconstructionMetrics(name, size)
        self._val_metrics.to(self.device).reset()
        self._val_images = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        posterior = self.encode(x)
        x_hat = self.decode(posterior.mode())
        net = self.perceptual_net()
        with torch.autocast(device_type=x.device.type, enabled=False):
            distance = net(x_hat.float().clamp(-1, 1), x.float()) if net is not None else None
        self._val_metrics.update(x, x_hat.clamp(-1, 1), posterior.kl(), distance)
        if self._val_images is None:
            count = self.hparams.num_logged_images
            self._val_images = (x[:count].detach(), x_hat[:count].detach())

    def on_validation_epoch_end(self) -> None:
        values = self._val_metrics.compute()
        self.log_dict({f"val/{name}": value for name, value in values.items()}, sync_dist=False, batch_size=1)
        if self._val_images is not None and not self.trainer.sanity_checking and self._due_for_images():
            self._log_reconstructions(*self._val_images)

    def _due_for_images(self) -> bool:
        every = self.hparams.image_every_n_steps
        due = every > 0 and (self.global_step // every != self._images_logged_at // every
                             or self.global_step == self.trainer.max_steps)
        if due:
            self._images_logged_at = self.global_step
        return due

    def _log_reconstructions(self, images: Tensor, reconstructions: Tensor) -> None:
        """Inputs (first row) over reconstructions (second row): a uint8 grid to the loggers and a PNG file."""
        if self.trainer.global_rank != 0:
            return
        from lightning_diffusion.diffusion.grids import image_grid, log_grid, save_png

        grid = image_grid(torch.cat([images, reconstructions.clamp(-1, 1)]), columns=images.shape[0])
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        save_png(grid, root / "reconstructions" / f"step{self.global_step:07d}.png")
        for logger in self.loggers:
            log_grid(logger, "val/reconstructions", grid, self.global_step, "top: inputs, bottom: reconstructions")
