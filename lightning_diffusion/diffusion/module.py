"""The conditional denoiser as a LightningModule: pixel or latent space, text / class / low-res conditions.

One training step: data ``x0`` (pixels, or scaled latents of the frozen VAE-GAN / diffusers VAE), a condition
(frozen text-encoder states, a class label, a low-res copy of the image), classifier-free dropping of the
condition to the null condition with probability ``p_uncond``, then the objective's regression loss
(``eps``/``v``/``x0`` under a VP schedule, rectified-flow velocity, or EDM's preconditioned x0 with its noise
levels and weighting; ``training_objective.py``). Sampling lives in :meth:`generate`, which
validation grids, the ``sample`` command and the metrics share. EMA of the weights is Lightning's
``EMAWeightAveraging`` callback (added by :meth:`configure_callbacks`): validation and checkpoints' ``state_dict``
use the averaged weights; the raw ones are kept under ``current_model_state``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor

from lightning_diffusion.diffusion.arguments import check_arguments
from lightning_diffusion.diffusion.conditioning import (
    Condition, Conditioning, NullCondition, condition_kinds, downsample_for_lowres, is_guidable, uncond_drop_mask,
)
from lightning_diffusion.diffusion.frozen import Frozen, load_text_encoder, load_vae
from lightning_diffusion.diffusion.grids import image_grid, log_grid, save_png
from lightning_diffusion.diffusion.sampling import SamplerName, check_options
from lightning_diffusion.diffusion.sampling import generate as generate_samples
from lightning_diffusion.diffusion.pre_encoded import check_pre_encoded, check_stored_tokens, stored_text_states
from lightning_diffusion.diffusion.training_objective import LossWeighting, NoiseSampling, Objective, TrainingObjective
from lightning_diffusion.diffusion.schedules import ScheduleName, make_schedule
from lightning_diffusion.diffusion.unet import UNet
from lightning_diffusion.errors import UserError
from lightning_diffusion.text_encoders import TextEncoderName, TextEncoderSpec, TextLayer, text_dims
from lightning_diffusion.training.compile import maybe_compile
from lightning_diffusion.training.nonfinite import (
    NonFiniteGuard, NonFiniteMode, any_rank_nonfinite, check_finite_weights, zero_loss,
)
from lightning_diffusion.training.optim import decay_groups

DEFAULT_HELDOUT_PROMPTS = ("a 3D rendered emoji of fox", "a flat vector emoji of fox")  # val-split concepts
DEFAULT_TRAIN_PROMPTS = ("a 3D rendered emoji of red apple", "a flat vector emoji of red apple")


class Denoiser(LightningModule):
    """A U-Net denoiser trained with one of five objectives; see the module docstring."""

    def __init__(
        self,
        *,
        image_size: int = 32,
        objective: Objective = "eps",
        schedule: ScheduleName = "cosine",
        num_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
        min_snr_gamma: float | None = None,
        noise_sampling: NoiseSampling | None = None,
        loss_weighting: LossWeighting | None = None,
        noise_mean: float | None = None,
        noise_std: float | None = None,
        sigma_data: float = 0.5,
        space: Literal["pixel", "latent"] = "pixel",
        vae_checkpoint: str | None = None,
        conditioning: Conditioning = "text",
        text_encoder: TextEncoderName = "minilm",
        clip_checkpoint: str | None = None,
        text_encoder_path: str | None = None,
        text_encoder_arch: str | None = None,
        text_layer: TextLayer = "last",
        num_classes: int | None = None,
        lowres_size: int | None = None,
        p_uncond: float = 0.1,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (16,),
        num_heads: int = 4,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        feed_forward: bool = False,
        channels_last: bool = False,
        compile: bool = False, compile_backend: str = "inductor", compile_mode: str | None = None,  # noqa: A002
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_decay: float | None = 0.999,
        val_sampler: SamplerName = "ddim",
        val_steps: int = 50,
        val_guidance: float | None = None,
        sampling: dict[str, Any] | None = None,
        heldout_prompts: tuple[str, ...] = DEFAULT_HELDOUT_PROMPTS,
        train_prompts: tuple[str, ...] = DEFAULT_TRAIN_PROMPTS,
        val_labels: tuple[int, ...] = (0, 1, 2, 3),
        samples_per_prompt: int = 4,
        grid_every_n_steps: int = 1000,
        val_timesteps: int = 8,
        seed: int = 0,
        nonfinite_loss: NonFiniteMode = "stop",
        max_nonfinite_skips: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.kinds = condition_kinds(conditioning)
        self.guidable = is_guidable(conditioning)
        self.val_guidance = (3.0 if self.guidable else 1.0) if val_guidance is None else val_guidance
        check_arguments(self.hparams, self.kinds, self.val_guidance)
        check_options(objective, val_sampler, sampling or {}, "model.sampling.")
        self.nonfinite = NonFiniteGuard(nonfinite_loss, max_nonfinite_skips, "denoiser",
                                        "lower model.lr, or use trainer.precision 32-true / bf16-mixed, not 16-mixed")
        if zero_terminal_snr and objective not in ("v", "x0"):
            raise UserError(f"model.zero_terminal_snr needs model.objective v (or x0): at zero SNR the input is pure "
                            f"noise, so {objective!r} has nothing to predict")
        self.schedule = make_schedule(schedule, num_timesteps, zero_terminal_snr)
        self.objective = TrainingObjective(objective, self.schedule, noise_sampling, loss_weighting, min_snr_gamma,
                                           noise_mean, noise_std, sigma_data)

        self._vae = Frozen(load_vae(vae_checkpoint)) if space == "latent" else None
        self._text_encoder = Frozen(load_text_encoder(self.hparams)) if "text" in self.kinds else None
        text_width, pooled_dim = text_dims(self._text_encoder)
        if self._text_encoder is not None:
            self.tokenizer = self._text_encoder.module.tokenizer  # the DataModule's tokenizer hook
        self.sample_shape = self._diffusion_input_shape()
        if self.sample_shape[-1] % 2 ** (len(channel_mult) - 1):
            raise UserError(f"the diffusion input is {self.sample_shape[-1]} px, not divisible by 2^"
                            f"{len(channel_mult) - 1} (one halving per extra entry of model.channel_mult): change "
                            f"model.image_size or model.channel_mult")

        self.unet = UNet(
            in_channels=self.sample_shape[0], image_size=self.sample_shape[-1], base_channels=base_channels,
            channel_mult=channel_mult, num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions,
            num_heads=num_heads, dropout=dropout, context_dim=text_width, pooled_dim=pooled_dim,
            num_classes=num_classes if "class" in self.kinds else None,
            lowres_channels=3 if "lowres" in self.kinds else 0, gradient_checkpointing=gradient_checkpointing,
            feed_forward=feed_forward, channels_last=channels_last,
        )
        maybe_compile(compile, [self.unet], compile_backend, compile_mode)  # in place: state_dict keys unchanged
        self.null = NullCondition(conditioning, text_width, pooled_dim, num_classes)
        self._grid_step: int | None = None
        self._reference: dict[str, Any] | None = None

    def _diffusion_input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` the U-Net denoises: the image, or the VAE latent of an image of ``image_size``."""
        size = self.hparams.image_size
        if self._vae is None:
            return (3, size, size)
        with torch.no_grad():
            return tuple(self._vae.module.encode(torch.zeros(1, 3, size, size)).mode().shape[1:])

    # ---------------------------------------------------------------- network, data and conditions
    def forward(self, x_t: Tensor, t: Tensor, condition: Condition) -> Tensor:
        """The prediction at time ``t`` (VP step, flow time, or EDM sigma), see ``training_objective.py``."""
        return self.objective.predict(self.unet, x_t, t, condition)

    @torch.no_grad()
    def encode_images(self, images: Tensor, sample: bool = True) -> Tensor:
        """Images in [-1, 1] to diffusion space: themselves, or scaled VAE latents (posterior sample or mode)."""
        if self._vae is None:
            return images
        vae = self._vae.on(self.device)
        posterior = vae.encode(images)
        return vae.scale_latents(posterior.sample() if sample else posterior.mode())

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Diffusion space back to images in [-1, 1]."""
        if self._vae is None:
            return x.clamp(-1, 1)
        vae = self._vae.on(self.device)
        return vae.decode(vae.unscale_latents(x)).clamp(-1, 1)

    def batch_x0(self, batch: dict[str, Any], sample: bool = True) -> Tensor:
        """The clean data of a batch; a pre-encoded ``latent`` entry (unscaled VAE latents) skips the encoder."""
        if self._vae is not None and "latent" in batch:
            return self._vae.on(self.device).scale_latents(batch["latent"])
        if "image" not in batch:
            raise UserError("the batches carry no `image` (nor `latent` for a latent model): check data.train_urls")
        return self.encode_images(batch["image"], sample)

    @torch.no_grad()
    def text_condition(self, tokens: Tensor, stored: tuple[Tensor, Tensor] | None = None) -> Condition:
        """Frozen text-encoder states, the encoder's mask of real (non-padding) tokens and the pooled embedding;
        ``stored`` (states, pooled) written by ``encode-latents --text-encoder`` replace the encoder's forward."""
        encoder = self._text_encoder.on(self.device)
        tokens = tokens.to(self.device)
        states, pooled = encoder(tokens) if stored is None else stored
        check_stored_tokens(stored, tokens)
        mask = encoder.token_mask(tokens).clone()
        mask[:, 0] = True  # an empty caption still attends to its first (start) token
        return {"context": states, "context_mask": mask, "pooled": pooled}

    def make_condition(self, captions: list[str] | None = None, labels: Tensor | None = None,
                       lowres: Tensor | None = None, tokens: Tensor | None = None,
                       stored_text: tuple[Tensor, Tensor] | None = None) -> Condition:
        """The U-Net condition for the model's kinds; each needed input must be given."""
        condition: Condition = {}
        if "text" in self.kinds:
            if tokens is None:
                if captions is None:
                    raise UserError("this denoiser is text-conditioned: give captions (prompts)")
                tokens = self.tokenizer(list(captions))
            condition.update(self.text_condition(tokens, stored_text))
        if "class" in self.kinds:
            if labels is None:
                raise UserError("this denoiser is class-conditioned: give labels (the batches need `label`)")
            labels = torch.as_tensor(labels, device=self.device).long()
            if labels.min() < 0 or labels.max() >= self.hparams.num_classes:
                raise UserError(f"class labels must be in [0, {self.hparams.num_classes}); got {labels.tolist()}")
            condition["label"] = labels
        if "lowres" in self.kinds:
            if lowres is None:
                raise UserError("this denoiser is a super-resolution stage: give the low-resolution image")
            condition["lowres"] = lowres.to(self.device)
        return condition

    def batch_condition(self, batch: dict[str, Any]) -> Condition:
        """The condition of a batch; text states stored in the shards (``text_emb``/``text_pooled``) are used as is."""
        lowres = stored = None
        if "lowres" in self.kinds:
            lowres = downsample_for_lowres(batch["image"], self.hparams.lowres_size)
        if "text" in self.kinds and "text_emb" in batch:
            stored = stored_text_states(batch, self.null.null_token.shape[0], self.null.null_pooled.shape[0],
                                        self.device)
        return self.make_condition(batch.get("caption"), batch.get("label"), lowres, batch.get("tokens"), stored)

    def setup(self, stage: str) -> None:
        """Before fitting on pre-encoded shards, check they come from this model's frozen autoencoder / text tower."""
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if stage != "fit" or not hasattr(data, "shard_urls"):
            return
        from lightning_diffusion.autoencoder.frozen_autoencoder import autoencoder_sha256

        hp = self.hparams
        check_pre_encoded(data.shard_urls("train") + data.shard_urls("val"), data.tensor_keys,
                          latent_shape=self.sample_shape if self._vae is not None else None,
                          vae_checkpoint=hp.vae_checkpoint if self._vae is not None else None,
                          text_encoder=TextEncoderSpec.from_hparams(hp) if "text" in self.kinds else None,
                          sha256=autoencoder_sha256)

    # ---------------------------------------------------------------- training
    def drop_mask(self, batch_size: int, batch_idx: int) -> Tensor:
        """Which samples of this batch train unconditionally (see :func:`uncond_drop_mask`)."""
        mask = uncond_drop_mask(batch_size, self.hparams.p_uncond, self.hparams.seed, self.global_step, batch_idx,
                                self.global_rank)
        return mask.to(self.device)

    def loss_at(self, x0: Tensor, noise: Tensor, t: Tensor, condition: Condition, weighted: bool = True) -> Tensor:
        """The objective's loss for data ``x0``, noise and times ``t`` (VP steps, flow times or EDM sigmas)."""
        return self.objective.loss(lambda x_t, t_: self(x_t, t_, condition), x0, noise, t, weighted)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.nonfinite.remember_norm_stats(self)
        x0 = self.batch_x0(batch)
        condition = self.batch_condition(batch)
        if self.guidable:  # also at p_uncond 0: the null parameters stay in the graph, as plain DDP requires
            condition = self.null.drop(condition, self.drop_mask(x0.shape[0], batch_idx))
        t = self.objective.sample_times(x0.shape[0], self.device)
        loss = self.loss_at(x0, torch.randn_like(x0), t, condition)
        skip = self.nonfinite.skip_step(any_rank_nonfinite(self, [loss]), self.global_step, f"loss={loss.item():.4g}")
        self.nonfinite.log_count(self, x0.shape[0])
        if skip:
            return zero_loss(self)  # every rank skips (they agreed); `on_before_optimizer_step` drops the gradients
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite_weights(checkpoint, "denoiser", self.global_step)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.nonfinite.drop_gradients(optimizer)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(decay_groups(self, hp.weight_decay), lr=hp.lr)  # no decay: norms, biases, ...
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, hp.warmup_steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def configure_callbacks(self) -> list[Any]:
        """EMA of the weights via Lightning's callback, updated after every optimiser step.

        The averaged copy is made in the callback's ``setup``, before the strategy moves the model, so it is placed
        on the strategy's device explicitly (else it would stay on the CPU and copy every parameter each step).
        """
        if not self.hparams.ema_decay:
            return []
        device = self._trainer.strategy.root_device if self._trainer is not None else None
        return [EMAWeightAveraging(decay=self.hparams.ema_decay, device=device)]

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x0 = self.batch_x0(batch, sample=False)
        condition = self.batch_condition(batch)
        generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed + batch_idx)
        losses = []
        for time in self.objective.fixed_times(self.hparams.val_timesteps).tolist():
            noise = torch.randn(x0.shape, generator=generator, device=self.device, dtype=x0.dtype)
            t = torch.full((x0.shape[0],), time, device=self.device)
            losses.append(self.loss_at(x0, noise, t, condition, weighted=False))
            self.log(f"val/loss_t{self.objective.time_label(time)}", losses[-1], batch_size=x0.shape[0], sync_dist=True)
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=x0.shape[0], sync_dist=True)
        if batch_idx == 0 and self._reference is None:
            n = self.hparams.samples_per_prompt * 2
            self._reference = {key: batch[key][:n] for key in ("image", "caption", "label") if key in batch}
        if batch_idx == 0:
            self.log_validation_grids()

    def log_validation_grids(self) -> None:
        """Sample grids, drawn at the first validation batch: the EMA callback has swapped the averaged weights in
        for the validation epoch and swaps them out again in its ``on_validation_epoch_end``, which Lightning calls
        before the module's own."""
        due = self._grid_step is None or self.global_step - self._grid_step >= self.hparams.grid_every_n_steps
        if self.trainer.sanity_checking or not due or not self.trainer.is_global_zero:
            return
        self._grid_step = self.global_step
        for name, (images, captions, columns) in self.validation_grids().items():
            grid = image_grid(images, columns)
            root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            path = save_png(grid, root / "samples" / f"{name}_step{self.global_step:07d}.png")
            path.with_suffix(".txt").write_text("\n".join(captions) + "\n")
            log_grid(self.logger, f"samples/{name}", grid, self.global_step, " | ".join(dict.fromkeys(captions)))

    def validation_grids(self) -> dict[str, tuple[Tensor, list[str], int]]:
        """Grids of the fixed prompts (held-out and training concepts), labels or low-res references."""
        hp, k = self.hparams, self.hparams.samples_per_prompt
        grids = {}
        if "lowres" in self.kinds and self._reference is not None:
            ref = self._reference
            lowres = downsample_for_lowres(ref["image"].to(self.device), hp.lowres_size)
            images = self.generate(ref.get("caption"), ref.get("label"), lowres)
            upsampled = F.interpolate(lowres, size=images.shape[-2:], mode="nearest").to(images)
            rows = torch.cat([upsampled, images, ref["image"].to(images)])  # input, upscaled, ground truth
            grids["lowres"] = (rows, list(ref.get("caption", [])), len(images))
        elif "text" in self.kinds:
            for name, prompts in (("heldout", hp.heldout_prompts), ("train", hp.train_prompts)):
                captions = [p for p in prompts for _ in range(k)]
                grids[name] = (self.generate(captions), captions, k)
        elif "class" in self.kinds:
            labels = [label for label in hp.val_labels for _ in range(k)]
            grids["labels"] = (self.generate(labels=labels), [f"label {label}" for label in labels], k)
        elif not self.kinds:
            grids["unconditional"] = (self.generate(num_samples=k * 4), [], k)
        return grids

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        captions: list[str] | None = None,
        labels: list[int] | Tensor | None = None,
        lowres: Tensor | None = None,
        num_samples: int | None = None,
        *,
        guidance: float | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        first_index: int = 0,
        progress: bool = False,
        **options: Any,
    ) -> Tensor:
        """Images in [-1, 1], one per caption / label / low-res image (``num_samples`` for an unconditional
        model), with the validation defaults (``val_sampler``, ``val_steps``, ``sampling``) unless overridden by
        ``sampler``, ``steps`` or the ``sampling`` options (``diffusion/sampling.py``). Sample ``k`` draws from the
        stream of index ``first_index + k``, so the same seed gives the same images whatever the batch size."""
        return generate_samples(self, captions, labels, lowres, num_samples, guidance=guidance, seed=seed,
                                first_index=first_index, progress=progress, sampler=sampler, steps=steps,
                                **options)
