"""Guidance: wrappers that turn a model (and a classifier) into the ``model_fn(x_t, t)`` the samplers call.

Classifier-free guidance convention (Ho & Salimans 2022, as in Imagen / Stable Diffusion): ``scale`` is the
weight ``w`` in ``out = uncond + w (cond - uncond)``: ``w = 1`` is the plain conditional model, ``w = 0`` the
unconditional one, ``w > 1`` guides (typically 3-7.5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_diffusion.diffusion.objectives import Prediction, check_prediction, output_from_x0_eps, to_x0_eps
from lightning_diffusion.diffusion.schedules import NoiseSchedule
from lightning_diffusion.errors import UserError

ConditionalModel = Callable[[Tensor, Tensor, Any], Tensor]
ModelFn = Callable[[Tensor, Tensor], Tensor]


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


def classifier_free_guidance(model: ConditionalModel, cond: Any, null_cond: Any, scale: float) -> ModelFn:
    """``model_fn(x, t) = uncond + scale * (cond_out - uncond_out)`` from ONE batched forward of ``model``.

    ``model(x, t, c)`` is called on ``cat([x, x])`` with ``cat([cond, null_cond])``; ``cond`` may be a tensor or a
    dict of tensors (tokens and mask, labels, a low-resolution image), each concatenated along the batch dim.
    ``scale = 1`` runs only the conditional half and ``scale = 0`` only the unconditional half.
    """

    def guided(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1:
            return model(x, t, cond)
        if scale == 0:
            return model(x, t, _expand_null(null_cond, x.shape[0]))
        both = model(torch.cat([x, x]), torch.cat([t, t]), _cat_conditions(cond, null_cond, x.shape[0]))
        cond_out, uncond_out = both.chunk(2)
        return uncond_out + scale * (cond_out - uncond_out)

    return guided


def classifier_guidance(
    model_fn: ModelFn,
    classifier_log_prob: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    scale: float,
    prediction: Prediction,
) -> ModelFn:
    """Classifier guidance (Dhariwal & Nichol 2021): ``eps~ = eps_hat - scale sqrt(1 - abar_t) grad_x log p(y|x_t)``.

    ``classifier_log_prob(x_t, t)`` returns ``log p(y | x_t)`` [B] for the wanted labels (it closes over them).
    The guided prediction is returned in the model's own parameterisation. Gradients are switched on for the
    classifier only, so this works inside the samplers' ``no_grad``.
    """
    check_prediction(prediction)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            out = model_fn(x, t)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_prob = classifier_log_prob(x_in, t)
            if log_prob.shape != (x.shape[0],):
                raise ValueError(f"classifier_log_prob must return shape [{x.shape[0]}]; got {tuple(log_prob.shape)}")
            (grad,) = torch.autograd.grad(log_prob.sum(), x_in)
        x0, eps = to_x0_eps(prediction, out, x, schedule, t)
        signal, noise = schedule.signal_noise(t, x)
        eps = eps - scale * noise * grad.to(x.dtype)
        x0 = (x - noise * eps) / signal
        return output_from_x0_eps(prediction, x0, eps, signal, noise)

    return guided


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen's dynamic thresholding: per sample ``s = max(1, quantile(|x0|, percentile))``, ``clip(x0, -s, s) / s``."""
    if not 0 < percentile <= 1:
        raise UserError(f"dynamic-threshold percentile must be in (0, 1]; got {percentile}")
    flat = x0.detach().abs().flatten(1)
    s = torch.quantile(flat.float() if flat.dtype not in (torch.float32, torch.float64) else flat, percentile, dim=1)
    s = s.clamp(min=1).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s
