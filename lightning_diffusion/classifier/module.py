"""`NoisyClassifier`: predicts a sample's class label from its noised version ``x_t`` at a random step ``t``.

Trained with cross-entropy on ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, ``t`` uniform over the VP
schedule's steps, ``x_0`` pixels or (``space: latent``) the frozen VAE-GAN's ``latent_scale``-scaled latents, as the
latent denoiser sees them, so ``grad_x log p(y | x_t)`` can steer a denoiser of the same schedule at every step (classifier
guidance, Dhariwal & Nichol 2021; ``classifier/guidance.py``). Labels are the batches' ``label`` (integer json
``label``, a ``cls`` entry, or ``data.label_field``). Validation: accuracy and loss per bucket of ``t``
(``val/acc_t0-200``, ...) with fixed draws, the same in every run, and their means ``val/acc``, ``val/loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor

from lightning_diffusion.classifier.network import EncoderClassifier
from lightning_diffusion.diffusion.frozen import Frozen, load_vae
from lightning_diffusion.diffusion.schedules import ScheduleName, make_schedule
from lightning_diffusion.errors import UserError, check_positive
from lightning_diffusion.training.nonfinite import (
    NonFiniteGuard, NonFiniteMode, any_rank_nonfinite, check_finite_weights, zero_loss,
)


class NoisyClassifier(LightningModule):
    """A time-conditioned image classifier for classifier guidance; see the module docstring."""

    def __init__(
        self,
        *,
        num_classes: int = 2,
        image_size: int = 32,
        space: Literal["pixel", "latent"] = "pixel",
        vae_checkpoint: str | None = None,
        schedule: ScheduleName = "cosine",
        num_timesteps: int = 1000,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolutions: tuple[int, ...] = (16,),
        num_heads: int = 4,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        val_buckets: int = 5,
        seed: int = 0,
        nonfinite_loss: NonFiniteMode = "stop",
        max_nonfinite_skips: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for key, value, example in (("num_classes", num_classes, 2), ("image_size", image_size, 32),
                                    ("base_channels", base_channels, 32), ("num_heads", num_heads, 4),
                                    ("val_buckets", val_buckets, 5)):
            check_positive(f"model.{key}", value, example)
        check_positive("model.lr", lr, 1e-3, integer=False)
        if num_classes < 2:
            raise UserError(f"model.num_classes must be at least 2 (one label is nothing to guide); got {num_classes}")
        self._vae = Frozen(load_vae(vae_checkpoint)) if space == "latent" else None
        self.input_shape = self._input_shape()
        if self.input_shape[-1] % 2 ** (len(channel_mult) - 1):
            raise UserError(f"the classifier's input is {self.input_shape[-1]} px, not divisible by 2^"
                            f"{len(channel_mult) - 1} (one halving per extra entry of model.channel_mult): change "
                            "model.image_size or model.channel_mult")
        self.schedule = make_schedule(schedule, num_timesteps)
        if not 1 <= val_buckets <= self.schedule.num_timesteps:
            raise UserError(f"model.val_buckets must be between 1 and model.num_timesteps; got {val_buckets}")
        self.network = EncoderClassifier(
            num_classes=num_classes, in_channels=self.input_shape[0], image_size=self.input_shape[-1], base_channels=base_channels, channel_mult=channel_mult,
            num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions, num_heads=num_heads,
            dropout=dropout,
        )
        self.nonfinite = NonFiniteGuard(nonfinite_loss, max_nonfinite_skips, "classifier", "lower model.lr")

    def _input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the classifier reads: the image, or the VAE latent of an image of ``image_size``."""
        size = self.hparams.image_size
        if self._vae is None:
            return (3, size, size)
        with torch.no_grad():
            return tuple(self._vae.module.encode(torch.zeros(1, 3, size, size)).mode().shape[1:])

    @torch.no_grad()
    def batch_x0(self, batch: dict[str, Any]) -> Tensor:
        """The clean input of a batch: images, or scaled latents (encoded here, or pre-encoded ``latent`` entries)."""
        if self._vae is None:
            return batch["image"]
        vae = self._vae.on(self.device)
        if "latent" in batch:
            return batch["latent"] * vae.latent_scale
        return vae.encode(batch["image"]).sample() * vae.latent_scale

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Class logits [B, num_classes] of noisy inputs at timesteps ``t`` (integer or float) [B]."""
        return self.network(x_t, torch.as_tensor(t, device=x_t.device))

    def log_prob(self, x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """``log p(y = labels | x_t)`` [B], the quantity whose gradient guides sampling."""
        log_probs = F.log_softmax(self(x_t, t).float(), dim=-1)
        return log_probs.gather(1, labels.to(x_t.device).long()[:, None])[:, 0]

    def guidance_log_prob(self, labels: Tensor | list[int]) -> Callable[[Tensor, Tensor], Tensor]:
        """``(x_t, t) -> log p(labels | x_t)``, the callable ``diffusion.guidance.classifier_guidance`` takes."""
        labels = torch.as_tensor(labels).long()
        if labels.min() < 0 or labels.max() >= self.hparams.num_classes:
            raise UserError(f"--label must be in [0, {self.hparams.num_classes}) for this classifier; got "
                            f"{sorted(set(labels.tolist()))}")
        return lambda x_t, t: self.log_prob(x_t, t, labels)

    def batch_labels(self, batch: dict[str, Any]) -> Tensor:
        labels = batch.get("label")
        if labels is None or bool((labels < 0).any()) or bool((labels >= self.hparams.num_classes).any()):
            found = "none" if labels is None else sorted(set(labels.tolist()))
            raise UserError(f"the classifier needs every batch's `label` in [0, {self.hparams.num_classes}) (found "
                            f"{found}): set data.label_field and data.label_classes (e.g. style, [3d, flat])")
        return labels.to(self.device)

    def noised(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.schedule.add_noise(x0, noise, t)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.nonfinite.remember_norm_stats(self)
        x0, labels = self.batch_x0(batch), self.batch_labels(batch)
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=self.device)
        logits = self(self.noised(x0, t), t)
        loss = F.cross_entropy(logits.float(), labels)
        skip = self.nonfinite.skip_step(any_rank_nonfinite(self, [loss]), self.global_step, f"loss={loss.item():.4g}")
        self.nonfinite.log_count(self, x0.shape[0])
        if skip:
            return zero_loss(self)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        self.log("train/acc", (logits.argmax(-1) == labels).float().mean(), batch_size=x0.shape[0])
        return loss

    def buckets(self) -> list[tuple[int, int]]:
        """``val_buckets`` contiguous ranges ``[lo, hi)`` of timesteps covering the schedule."""
        edges = torch.linspace(0, self.schedule.num_timesteps, self.hparams.val_buckets + 1).round().long().tolist()
        return list(zip(edges[:-1], edges[1:]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x0, labels = self.batch_x0(batch), self.batch_labels(batch)
        generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed + batch_idx)
        accuracies, losses = [], []
        for lo, hi in self.buckets():
            t = torch.randint(lo, hi, (x0.shape[0],), generator=generator, device=self.device)
            logits = self(self.noised(x0, t, generator), t).float()
            accuracies.append((logits.argmax(-1) == labels).float().mean())
            losses.append(F.cross_entropy(logits, labels))
            self.log(f"val/acc_t{lo}-{hi}", accuracies[-1], batch_size=x0.shape[0], sync_dist=True)
        self.log("val/acc", torch.stack(accuracies).mean(), prog_bar=True, batch_size=x0.shape[0], sync_dist=True)
        self.log("val/loss", torch.stack(losses).mean(), batch_size=x0.shape[0], sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite_weights(checkpoint, "classifier", self.global_step)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.nonfinite.drop_gradients(optimizer)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, hp.warmup_steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    @classmethod
    def load_frozen(cls, path: str | Path, key: str = "--classifier") -> NoisyClassifier:
        """The classifier of a checkpoint, in eval mode with its weights frozen (inputs still take gradients)."""
        from lightning_diffusion.training.checkpoints import check_checkpoint_class, load_checkpoint

        checkpoint = load_checkpoint(path, what="classifier checkpoint", key=key)
        check_checkpoint_class(checkpoint, "classifier", path=path, key=key)
        hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
        try:
            model = cls(**hparams)
            model.load_state_dict(checkpoint["state_dict"], strict=True)
        except (TypeError, KeyError, RuntimeError) as err:
            raise UserError(f"'{path}' ({key}) is not a classifier checkpoint ({str(err).splitlines()[0]}): pass one "
                            "written by `python -m lightning_diffusion fit --config configs/classifier/tiny.yaml`") from err
        return model.eval().requires_grad_(False)
