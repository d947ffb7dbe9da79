"""Samplers as short pure functions over a model callable (the k-diffusion / EDM style).

VP samplers call ``model_fn(x_t, t) -> model_output`` with ``t`` a LongTensor [B] of discrete steps (the
probability-flow sampler passes float ``t`` when ``quantize=False``) and read the output as ``prediction``
(``eps``, ``v`` or ``x0``). Flow samplers call ``velocity_fn(x_t, t)`` with float ``t`` [B] in [0, 1].
Every random draw takes ``generator``, so a seed fixes the samples; everything runs under ``torch.no_grad()``
(classifier guidance turns gradients back on inside its own callable).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_diffusion.diffusion.objectives import Prediction, check_prediction, to_x0_eps
from lightning_diffusion.diffusion.schedules import NoiseSchedule
from lightning_diffusion.errors import UserError

ModelFn = Callable[[Tensor, Tensor], Tensor]
ThresholdFn = Callable[[Tensor], Tensor]
Spacing = Literal["leading", "trailing", "linspace"]


def _initial(
    shape: Sequence[int],
    given: Tensor | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> Tensor:
    """The starting point: ``given`` if set, else N(0, I) on ``device`` (default: the generator's, else CPU)."""
    if given is not None:
        return given.to(dtype)
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def _gaussian_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _abar(schedule: NoiseSchedule, t: int) -> float:
    """``abar_t`` as a Python float (float64); ``t < 0`` is clean data, ``abar = 1``."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _timestep(t: int | float, x: Tensor) -> Tensor:
    """``t`` repeated over the batch: a LongTensor for an int, a float32 tensor for a float."""
    dtype = torch.long if isinstance(t, int) else torch.float32
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)


def predict_x0_eps(
    prediction: Prediction,
    model_output: Tensor,
    x_t: Tensor,
    schedule: NoiseSchedule,
    t: Tensor | int,
    clip_x0: float | None = None,
    threshold: ThresholdFn | None = None,
) -> tuple[Tensor, Tensor]:
    """``(x0_hat, eps_hat)``; when ``x0_hat`` is clipped (``clip_x0``) or thresholded, ``eps_hat`` is recomputed
    from it so that ``x_t = sqrt(abar) x0_hat + sqrt(1 - abar) eps_hat`` still holds."""
    x0, eps = to_x0_eps(prediction, model_output, x_t, schedule, t)
    if threshold is None and clip_x0 is None:
        return x0, eps
    x0 = threshold(x0) if threshold is not None else x0.clamp(-clip_x0, clip_x0)
    signal, noise = schedule.signal_noise(t, x_t)
    return x0, (x_t - signal * x0) / noise


def ddim_timesteps(num_timesteps: int, steps: int, spacing: Spacing = "leading") -> list[int]:
    """Descending sub-sequence of ``steps`` timesteps, spaced as diffusers' ``timestep_spacing`` (Lin et al. 2023).

    ``leading``: ``0, k, 2k, ...`` with ``k = T // steps``; ``trailing``: ``round(T - i T/steps) - 1``, which starts
    at ``T - 1``; ``linspace``: ``round(linspace(0, T - 1, steps))``.
    """
    if not 1 <= steps <= num_timesteps:
        raise UserError(f"sampling steps must be between 1 and the {num_timesteps} training timesteps; got {steps}")
    if spacing == "leading":
        ts = [i * (num_timesteps // steps) for i in range(steps)]
    elif spacing == "trailing":
        ratio = num_timesteps / steps
        ts = [round(num_timesteps - i * ratio) - 1 for i in range(steps)][::-1]
    elif spacing == "linspace":
        ts = [round(v) for v in torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).tolist()]
    else:
        raise UserError(f"unknown timestep spacing {spacing!r}; use 'leading', 'trailing' or 'linspace'")
    return sorted(ts, reverse=True)


def ddpm_step(
    model_output: Tensor,
    x_t: Tensor,
    t: int,
    schedule: NoiseSchedule,
    prediction: Prediction,
    variance: Literal["beta", "posterior"] = "posterior",
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    clip_x0: float | None = None,
    threshold: ThresholdFn | None = None,
    t_prev: int | None = None,
) -> Tensor:
    """One ancestral step ``x_t -> x_{t_prev}`` of DDPM (Ho et al. 2020, eq. 7), ``t_prev = t - 1`` by default.

    Mean: the posterior ``q(x_prev | x_t, x0_hat)``; variance: ``beta_t`` or the posterior ``beta~_t``, with
    ``beta_t = 1 - abar_t / abar_prev`` so respaced steps (Nichol & Dhariwal 2021) use the same formula.
    No noise is added on the final step (``t_prev = -1``).
    """
    t_prev = t - 1 if t_prev is None else t_prev
    abar_t, abar_prev = _abar(schedule, t), _abar(schedule, t_prev)
    beta = 1 - abar_t / abar_prev
    x0, _ = predict_x0_eps(prediction, model_output, x_t, schedule, t, clip_x0, threshold)
    mean = (math.sqrt(abar_prev) * beta / (1 - abar_t)) * x0 + (
        math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t)
    ) * x_t
    if t_prev < 0:
        return mean
    if variance == "beta":
        var = beta
    elif variance == "posterior":
        var = (1 - abar_prev) / (1 - abar_t) * beta
    else:
        raise UserError(f"unknown DDPM variance {variance!r}; use 'beta' or 'posterior'")
    noise = _gaussian_like(x_t, generator) if noise is None else noise
    return mean + math.sqrt(var) * noise


def ddim_step(
    model_output: Tensor,
    x_t: Tensor,
    t: int,
    t_prev: int,
    schedule: NoiseSchedule,
    prediction: Prediction,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    clip_x0: float | None = None,
    threshold: ThresholdFn | None = None,
) -> Tensor:
    """One DDIM step ``x_t -> x_{t_prev}`` (Song et al. 2021, eq. 12); ``t_prev = -1`` means ``abar_prev = 1``.

    ``x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z`` with
    ``sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)``: eta = 0 is deterministic,
    eta = 1 is DDPM's posterior variance.
    """
    abar_t, abar_prev = _abar(schedule, t), _abar(schedule, t_prev)
    x0, eps = predict_x0_eps(prediction, model_output, x_t, schedule, t, clip_x0, threshold)
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * (_gaussian_like(x_t, generator) if noise is None else noise)
    return x_prev


@torch.no_grad()
def ddpm_sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    prediction: Prediction,
    variance: Literal["beta", "posterior"] = "posterior",
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
    progress: bool = False,
    clip_x0: float | None = None,
    threshold: ThresholdFn | None = None,
    steps: int | None = None,
    spacing: Spacing = "leading",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Ancestral DDPM sampling from ``x_T ~ N(0, I)`` over all ``T`` steps, or ``steps`` respaced ones."""
    check_prediction(prediction)
    T = schedule.num_timesteps
    timesteps = list(range(T - 1, -1, -1)) if steps is None else ddim_timesteps(T, steps, spacing)
    x = _initial(shape, x_T, generator, device, dtype)
    for i, t in enumerate(tqdm(timesteps, desc="DDPM", disable=not progress)):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        out = model_fn(x, _timestep(t, x))
        x = ddpm_step(out, x, t, schedule, prediction, variance, generator, None, clip_x0, threshold, t_prev)
    return x


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    prediction: Prediction,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
    progress: bool = False,
    spacing: Spacing = "leading",
    clip_x0: float | None = None,
    threshold: ThresholdFn | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DDIM sampling over ``ddim_timesteps(T, steps, spacing)``, each step going to the next one in the list."""
    check_prediction(prediction)
    timesteps = ddim_timesteps(schedule.num_timesteps, steps, spacing)
    x = _initial(shape, x_T, generator, device, dtype)
    for i, t in enumerate(tqdm(timesteps, desc="DDIM", disable=not progress)):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        out = model_fn(x, _timestep(t, x))
        x = ddim_step(out, x, t, t_prev, schedule, prediction, eta, generator, None, clip_x0, threshold)
    return x


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> Tensor:
    """EDM's noise levels (Karras et al. 2022, eq. 5): ``steps`` values from ``sigma_max`` down to ``sigma_min``."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def probability_flow_sigmas(
    schedule: NoiseSchedule,
    steps: int,
    grid: Literal["karras", "timesteps"] = "karras",
    spacing: Spacing = "trailing",
    rho: float = 7.0,
    quantize: bool = True,
    sigma_max: float | None = 80.0,
) -> Tensor:
    """The decreasing float64 sigma grid of :func:`probability_flow_sample`, ending with 0.

    ``karras``: EDM's rho-spaced levels from ``min(sigma_max, the schedule's largest)`` down to the schedule's
    smallest sigma. EDM's 80 (signal rate 1/80, near the linear schedule's 1/157 at t = T-1) saves the steps
    the cosine schedule's ~2e4 tail would spend; ``None`` starts at the schedule's top.
    ``timesteps``: the sigmas of ``ddim_timesteps(T, steps, spacing)``. ``quantize`` snaps each level to the
    nearest discrete step's sigma (in log sigma) and drops repeats, so the model only sees integer timesteps.
    """
    if grid == "karras":
        top = float(schedule.sigmas[-1]) if sigma_max is None else min(sigma_max, float(schedule.sigmas[-1]))
        sigmas = karras_sigmas(float(schedule.sigmas[0]), top, steps, rho)
    elif grid == "timesteps":
        sigmas = schedule.sigmas[ddim_timesteps(schedule.num_timesteps, steps, spacing)]
    else:
        raise UserError(f"unknown probability-flow sigma grid {grid!r}; use 'karras' or 'timesteps'")
    if quantize:
        sigmas = torch.unique_consecutive(schedule.t_to_sigma(schedule.sigma_to_t(sigmas).round()))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def probability_flow_sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    prediction: Prediction,
    steps: int,
    method: Literal["euler", "heun"] = "heun",
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
    progress: bool = False,
    grid: Literal["karras", "timesteps"] = "karras",
    spacing: Spacing = "trailing",
    rho: float = 7.0,
    quantize: bool = True,
    sigma_max: float | None = 80.0,
    clip_x0: float | None = None,
    threshold: ThresholdFn | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Integrate the VP model's probability-flow ODE with Euler or Heun steps (Karras et al. 2022, Alg. 1).

    Discretisation: in ``z = x_t / sqrt(abar)`` and ``sigma = sqrt((1 - abar) / abar)`` the ODE is
    ``dz / dsigma = eps_hat(z / sqrt(1 + sigma^2), t(sigma))``, stepped over
    :func:`probability_flow_sigmas` down to ``sigma = 0`` (where ``z = x_0``); the last step, to 0, is an Euler
    step. ``t(sigma)`` interpolates ``log sigma`` between discrete steps; unless ``quantize`` it is fractional
    and ``model_fn`` receives float timesteps. Euler on the ``timesteps`` grid is exactly DDIM with eta = 0.
    ``x_T`` (default N(0, I)) is a sample at the grid's first noise level in the usual VP scale.
    """
    check_prediction(prediction)
    if method not in ("euler", "heun"):
        raise UserError(f"unknown ODE method {method!r}; use 'euler' or 'heun'")
    sigmas = probability_flow_sigmas(schedule, steps, grid, spacing, rho, quantize, sigma_max)
    ts = schedule.sigma_to_t(sigmas[:-1])
    times: list[int | float] = [int(t) for t in ts.round().tolist()] if quantize else ts.tolist()

    def eps_hat(z: Tensor, i: int) -> Tensor:
        x = z / math.sqrt(1 + float(sigmas[i]) ** 2)
        t = _timestep(times[i], x)
        return predict_x0_eps(prediction, model_fn(x, t), x, schedule, t, clip_x0, threshold)[1]

    z = _initial(shape, x_T, generator, device, dtype) * math.sqrt(1 + float(sigmas[0]) ** 2)
    for i in tqdm(range(len(sigmas) - 1), desc=f"ODE ({method})", disable=not progress):
        h = float(sigmas[i + 1] - sigmas[i])
        d = eps_hat(z, i)
        z_next = z + h * d
        if method == "heun" and sigmas[i + 1] > 0:
            z_next = z + h * (d + eps_hat(z_next, i + 1)) / 2
        z = z_next
    return z


@torch.no_grad()
def flow_euler_sample(
    velocity_fn: ModelFn,
    shape: Sequence[int],
    steps: int,
    generator: torch.Generator | None = None,
    x_0: Tensor | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Euler integration of ``dx/dt = v(x, t)`` from noise ``x_0`` at ``t = 0`` to data at ``t = 1``, uniform steps."""
    x = _initial(shape, x_0, generator, device, dtype)
    times = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in tqdm(zip(times[:-1], times[1:]), total=steps, desc="flow (euler)", disable=not progress):
        x = x + (t_next - t) * velocity_fn(x, _timestep(t, x)).to(x.dtype)
    return x


@torch.no_grad()
def flow_heun_sample(
    velocity_fn: ModelFn,
    shape: Sequence[int],
    steps: int,
    generator: torch.Generator | None = None,
    x_0: Tensor | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Heun's second-order integration of the flow from ``t = 0`` to ``1``: ``2 * steps`` velocity evaluations."""
    x = _initial(shape, x_0, generator, device, dtype)
    times = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in tqdm(zip(times[:-1], times[1:]), total=steps, desc="flow (heun)", disable=not progress):
        h = t_next - t
        d = velocity_fn(x, _timestep(t, x)).to(x.dtype)
        x_euler = x + h * d
        x = x + h * (d + velocity_fn(x_euler, _timestep(t_next, x)).to(x.dtype)) / 2
    return x
