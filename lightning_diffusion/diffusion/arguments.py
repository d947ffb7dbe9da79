"""Checks of the denoiser's arguments and of sampling options: one `UserError` naming the key and the fix, raised
before any network is built or any file is written."""

from __future__ import annotations

from typing import Any

from lightning_diffusion.diffusion.conditioning import is_guidable
from lightning_diffusion.errors import UserError, check_positive


def check_sampler(objective: str, sampler: str, key: str = "sampler") -> None:
    """DDPM/DDIM step a VP model; the sigma-space samplers (``diffusion/sampling.py``) take any model."""
    from lightning_diffusion.diffusion.sampling import SAMPLERS

    if sampler not in SAMPLERS:
        raise UserError(f"unknown {key} {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if objective in ("flow", "edm") and sampler in ("ddim", "ddpm"):
        raise UserError(f"{key} {sampler!r} needs a DDPM-style model but this one uses the {objective} objective: "
                        f"use euler or heun")


def check_guidance(conditioning: str, guidance: float, key: str = "guidance") -> None:
    """Guidance contrasts a text/class condition with the null one; a model without such a condition has none."""
    if guidance < 0:
        raise UserError(f"{key} must be >= 0 (1 = plain conditional sampling); got {guidance}")
    if guidance != 1 and not is_guidable(conditioning):
        raise UserError(f"{key} {guidance} needs a text- or class-conditioned model, but this one's conditioning is "
                        f"{conditioning!r}: use {key} 1")


def check_sampling(hparams: Any, *, sampler: str | None = None, guidance: float | None = None,
                   steps: int | None = None, prefix: str = "") -> None:
    """Sampling options given to `generate`, `sample`, `evaluate` or `SampleMetrics` (None: not given), checked
    against the model's hparams; `prefix` names them as the user wrote them (`--`, `SampleMetrics.`)."""
    if sampler is not None:
        check_sampler(hparams["objective"], sampler, f"{prefix}sampler")
    if guidance is not None:
        check_guidance(hparams["conditioning"], guidance, f"{prefix}guidance")
    if steps is not None and steps < 1:
        raise UserError(f"{prefix}steps must be >= 1; got {steps}")


def check_arguments(hp: Any, kinds: tuple[str, ...], val_guidance: float) -> None:
    """The `Denoiser`'s constructor arguments (`hp`: its hparams) alone and together."""
    check_sampler(hp.objective, hp.val_sampler, "model.val_sampler")
    check_guidance(hp.conditioning, val_guidance, "model.val_guidance")
    for key, example in (("image_size", 32), ("base_channels", 64), ("num_res_blocks", 2), ("num_heads", 4)):
        check_positive(f"model.{key}", hp[key], example)
    check_positive("model.lr", hp.lr, 2e-4, integer=False)
    if isinstance(hp.num_timesteps, bool) or not isinstance(hp.num_timesteps, int) or hp.num_timesteps < 2:
        raise UserError(f"model.num_timesteps must be an integer of at least 2, got {hp.num_timesteps!r}; set e.g. "
                        "model.num_timesteps: 1000")
    if not hp.channel_mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in hp.channel_mult):
        raise UserError(f"model.channel_mult must be a non-empty list of positive integers, got "
                        f"{hp.channel_mult!r}; set e.g. model.channel_mult: [1, 2, 2]")
    if not 0 <= hp.p_uncond < 1:
        raise UserError(f"model.p_uncond must be in [0, 1); got {hp.p_uncond}")
    if "class" in kinds and not (hp.num_classes and hp.num_classes > 0):
        raise UserError("class conditioning needs model.num_classes (the number of labels in the data)")
    if "class" in kinds and not all(0 <= label < hp.num_classes for label in hp.val_labels):
        raise UserError(f"model.val_labels {list(hp.val_labels)} must lie in [0, model.num_classes = "
                        f"{hp.num_classes})")
    if "lowres" in kinds and not (hp.lowres_size and 0 < hp.lowres_size < hp.image_size):
        raise UserError(f"low-res conditioning needs model.lowres_size below model.image_size "
                        f"({hp.image_size}); got {hp.lowres_size}")
    if hp.val_steps < 1 or hp.val_timesteps < 1 or hp.samples_per_prompt < 1 or hp.grid_every_n_steps < 1:
        raise UserError("model.val_steps, val_timesteps, samples_per_prompt and grid_every_n_steps must be >= 1")
