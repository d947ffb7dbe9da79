"""Guidance: classifier-free guidance (+ CFG rescale) combines network outputs; classifier guidance wraps a
``SamplingDenoiser`` and returns one; dynamic thresholding is the denoiser's ``threshold``.

Classifier-free guidance convention (Ho & Salimans 2022, as in Imagen / Stable Diffusion): ``scale`` is the
weight ``w`` in ``out = uncond + w (cond - uncond)``: ``w = 1`` is the plain conditional model, ``w = 0`` the
unconditional one, ``w > 1`` guides (typically 3-7.5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_diffusion.diffusion.denoisers import NetworkFn, SamplingDenoiser, output_from_x0_eps
from lightning_diffusion.diffusion.objectives import Prediction, check_prediction
from lightning_diffusion.diffusion.schedules import NoiseSchedule
from lightning_diffusion.errors import UserError

ConditionalModel = Callable[[Tensor, Tensor, Any], Tensor]


def _expand_null(null_cond: Any, batch_size: int) -> Any:
    """``null_cond`` with a batch of 1 (one learned null embedding) expanded to ``batch_size``, entry by entry."""
    if isinstance(null_cond, Mapping):
        return {key: _expand_null(value, batch_size) for key, value in null_cond.items()}
    if null_cond is None or null_cond.shape[0] != 1 or batch_size == 1:
        return null_cond
    return null_cond.expand(batch_size, *null_cond.shape[1:])


def _cat_conditions(cond: Any, null_cond: Any, batch_size: int) -> Any:
    """``cat([cond, null_cond])`` along the batch dim, entry by entry for dicts."""
    if isinstance(cond, Mapping):
        if not isinstance(null_cond, Mapping) or set(cond) != set(null_cond):
            raise ValueError(f"cond and null_cond must be dicts with the same keys; got {cond.keys()} and {null_cond}")
        return {key: _cat_conditions(cond[key], null_cond[key], batch_size) for key in cond}
    if cond is None and null_cond is None:
        return None
    return torch.cat([cond, _expand_null(null_cond, batch_size).to(cond.device)])


def rescale_guidance(guided: Tensor, conditional: Tensor, rescale: float) -> Tensor:
    """CFG rescale (Lin et al. 2023, "Common diffusion noise schedules are flawed", eq. 15-16): scale the guided
    prediction per sample to the conditional one's std, then blend: ``rescale * rescaled + (1 - rescale) * guided``.
    Large guidance weights over-expose; this restores the conditional prediction's scale."""
    if not 0 <= rescale <= 1:
        raise UserError(f"CFG rescale must be in [0, 1] (0 = off, 0.7 in the paper); got {rescale}")
    dims = list(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def classifier_free_guidance(model: ConditionalModel, cond: Any, null_cond: Any, scale: float,
                             rescale: float = 0.0) -> NetworkFn:
    """``network(x, t) = uncond + scale * (cond_out - uncond_out)`` from ONE batched forward of ``model``.

    ``model(x, t, c)`` is called on ``cat([x, x])`` with ``cat([cond, null_cond])``; ``cond`` may be a tensor or a
    dict of tensors (tokens and mask, labels, a low-resolution image), each concatenated along the batch dim.
    ``scale = 1`` runs only the conditional half and ``scale = 0`` only the unconditional half. ``rescale > 0``
    applies :func:`rescale_guidance` to the output (as diffusers' ``guidance_rescale``). Wrap the result in a
    ``SamplingDenoiser`` for the samplers.
    """

    def guided(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1:
            return model(x, t, cond)
        if scale == 0:
            return model(x, t, _expand_null(null_cond, x.shape[0]))
        both = model(torch.cat([x, x]), torch.cat([t, t]), _cat_conditions(cond, null_cond, x.shape[0]))
        cond_out, uncond_out = both.chunk(2)
        out = uncond_out + scale * (cond_out - uncond_out)
        return rescale_guidance(out, cond_out, rescale) if rescale else out

    return guided


def classifier_guided(denoiser: SamplingDenoiser, classifier_log_prob: Callable[[Tensor, Tensor], Tensor],
                      scale: float) -> SamplingDenoiser:
    """Classifier guidance (Dhariwal & Nichol 2021) wrapping a denoiser: ``eps~ = eps_hat - scale * noise *
    grad log p(y | x_in)``, ``x0~`` recomputed from it (``noise = sqrt(1 - abar_t)`` for a VP model).

    ``classifier_log_prob(x_in, time)`` reads the network's input and time and returns ``log p(y | x_in)`` [B] for
    the wanted labels (it closes over them). Gradients are switched on for the classifier only, so this works
    inside the samplers' ``no_grad``; clipping / thresholding apply after guidance.
    """
    if scale < 0:
        raise UserError(f"classifier guidance scale must be >= 0 (0 = off); got {scale}")

    def guide(x_in: Tensor, time: Tensor, x0: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x_grad = x_in.detach().requires_grad_(True)
            log_prob = classifier_log_prob(x_grad, time)
            if log_prob.shape != (x_in.shape[0],):
                raise ValueError(f"classifier_log_prob must return shape [{x_in.shape[0]}]; "
                                 f"got {tuple(log_prob.shape)}")
            (grad,) = torch.autograd.grad(log_prob.sum(), x_grad)
        signal, noise = denoiser.rates(time, x_in)
        eps = eps - scale * noise * grad.to(x_in.dtype)
        return (x_in - noise * eps) / signal, eps

    return denoiser.wrap(guide)


def classifier_guidance(model_fn: NetworkFn, classifier_log_prob: Callable[[Tensor, Tensor], Tensor],
                        schedule: NoiseSchedule, scale: float, prediction: Prediction) -> NetworkFn:
    """:func:`classifier_guided` at the network level: the guided output in the model's own parameterisation,
    for callers that wrap a VP network callable ``model_fn(x_t, t)`` rather than a denoiser."""
    check_prediction(prediction)
    guided = classifier_guided(SamplingDenoiser(model_fn, prediction, schedule), classifier_log_prob, scale)

    def network(x: Tensor, t: Tensor) -> Tensor:
        x0, eps = guided.x0_eps_at(x, t)
        signal, noise = schedule.signal_noise(t, x)
        return output_from_x0_eps(prediction, x0, eps, signal, noise)

    return network


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen's dynamic thresholding: per sample ``s = max(1, quantile(|x0|, percentile))``, ``clip(x0, -s, s) / s``."""
    if not 0 < percentile <= 1:
        raise UserError(f"dynamic-threshold percentile must be in (0, 1]; got {percentile}")
    flat = x0.detach().abs().flatten(1)
    s = torch.quantile(flat.float() if flat.dtype not in (torch.float32, torch.float64) else flat, percentile, dim=1)
    s = s.clamp(min=1).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s
