"""Classifier guidance for a trained denoiser: the model-callable wrapper that ``Denoiser.generate`` applies.

``eps~ = eps_hat - s sqrt(1 - abar_t) grad_x log p(y | x_t)`` (``diffusion.guidance.classifier_guidance``) needs the
classifier to read ``x_t`` at step ``t`` as the denoiser does: the same VP schedule, the same space (pixels, or the
same VAE-GAN's latents) and shape, and a VP objective (eps, v or x0). Checked here, before any sampling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_diffusion.classifier.module import NoisyClassifier
from lightning_diffusion.diffusion.denoisers import NetworkFn
from lightning_diffusion.diffusion.guidance import classifier_guidance
from lightning_diffusion.diffusion.module import Denoiser
from lightning_diffusion.errors import UserError


def check_pair(denoiser: Denoiser, classifier: NoisyClassifier) -> None:
    """A ``UserError`` unless ``classifier`` reads the denoiser's noisy samples (schedule, size, objective)."""
    dh, ch = denoiser.hparams, classifier.hparams
    if dh.objective not in ("eps", "v", "x0"):
        raise UserError(f"--classifier guides VP denoisers (objective eps, v or x0); this one's objective is "
                        f"{dh.objective!r}: use a denoiser trained with one of those")
    if (dh.schedule, dh.num_timesteps) != (ch.schedule, ch.num_timesteps):
        raise UserError(f"--classifier was trained on the {ch.schedule} schedule with {ch.num_timesteps} steps, the "
                        f"denoiser on {dh.schedule} with {dh.num_timesteps}: train the classifier with the denoiser's "
                        "model.schedule and model.num_timesteps")
    if dh.get("zero_terminal_snr") and not ch.get("zero_terminal_snr"):
        raise UserError("--classifier was trained on the plain schedule, the denoiser on its zero-terminal-SNR rescaling "
                        "(model.zero_terminal_snr): their noisy samples differ; guide a denoiser without it")
    if (dh.space, dh.vae_checkpoint if dh.space == "latent" else None) != (ch.space, ch.vae_checkpoint):
        raise UserError(f"--classifier reads {ch.space} inputs (vae {ch.vae_checkpoint}), the denoiser samples "
                        f"{dh.space} ones (vae {dh.vae_checkpoint}): train the classifier with the denoiser's "
                        "model.space and model.vae_checkpoint")
    if tuple(denoiser.sample_shape) != tuple(classifier.input_shape):
        raise UserError(f"--classifier reads {tuple(classifier.input_shape)} inputs but the denoiser samples "
                        f"{tuple(denoiser.sample_shape)}: train the classifier at the denoiser's model.image_size")


def guidance_wrapper(denoiser: Denoiser, classifier: NoisyClassifier, labels: list[int] | torch.Tensor,
                     scale: float) -> Callable[[NetworkFn], NetworkFn]:
    """``model_fn -> guided model_fn`` steering each sample towards its label, for ``generate(model_wrapper=...)``."""
    check_pair(denoiser, classifier)
    if scale < 0:
        raise UserError(f"--classifier-scale must be >= 0 (0 = no guidance); got {scale}")
    log_prob = classifier.to(denoiser.device).guidance_log_prob(labels)
    schedule, objective = denoiser.schedule, denoiser.hparams.objective
    return lambda model_fn: classifier_guidance(model_fn, log_prob, schedule, scale, objective)
