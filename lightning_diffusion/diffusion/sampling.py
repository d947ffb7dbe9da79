"""Sampling orchestration: options -> denoiser wrapper -> sampler -> images, shared by validation grids, the
metrics, ``sample`` and ``evaluate`` (``Denoiser.generate`` delegates here).

Options (all optional; None = the default):
``sampler`` (ddim, ddpm, euler, heun, dpmpp_2m, dpmpp_2m_sde, euler_ancestral, edm), ``steps``;
``eta`` (DDIM, Euler ancestral, DPM-Solver++ SDE noise), ``variance`` (DDPM: posterior or beta);
``spacing`` (leading / trailing / linspace: DDIM / DDPM timesteps and the discrete sigma grid),
``grid`` (karras or discrete, for the sigma-space samplers), ``rho`` (the karras grid), ``s_churn`` (edm);
``threshold`` (dynamic thresholding percentile) or ``clip`` (x0_hat to [-clip, clip]; default 1 for pixel VP
models, 0 = off); ``cfg_rescale`` (Lin et al. 2023's guidance rescale phi).
A model's configured ``sampling`` defaults apply where they fit the sampler in use; options given explicitly
(``--eta`` ...) must fit it, else a ``UserError`` names the option and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lightning_diffusion.diffusion.denoisers import NetworkFn, SamplingDenoiser
from lightning_diffusion.diffusion.guidance import classifier_free_guidance, dynamic_threshold
from lightning_diffusion.diffusion.noise_grids import discrete_timesteps, flow_times, sigma_grid
from lightning_diffusion.diffusion.samplers import (
    ddim_sample, ddpm_sample, euler_sample, flow_euler_sample, flow_heun_sample, heun_sample,
)
from lightning_diffusion.diffusion.seeding import Generator, SampleGenerators, initial_noise
from lightning_diffusion.diffusion.solvers import (
    dpmpp_2m_sample, dpmpp_2m_sde_sample, edm_sample, euler_ancestral_sample,
)
from lightning_diffusion.errors import UserError

SamplerName = Literal["ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral", "edm"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
DISCRETE_SAMPLERS = ("ddim", "ddpm")
OPTIONS = ("eta", "variance", "spacing", "grid", "rho", "s_churn", "threshold", "clip", "cfg_rescale")
SIGMA_SAMPLERS = {"euler": euler_sample, "heun": heun_sample, "dpmpp_2m": dpmpp_2m_sample,
                  "dpmpp_2m_sde": dpmpp_2m_sde_sample, "euler_ancestral": euler_ancestral_sample, "edm": edm_sample}
ETA_SAMPLERS = ("ddim", "euler_ancestral", "dpmpp_2m_sde")


def _uses_flow_times(objective: str, sampler: str) -> bool:
    return objective == "flow" and sampler in ("euler", "heun")


def check_options(objective: str, sampler: str, options: dict[str, Any], prefix: str = "") -> None:
    """A ``UserError`` (one line, naming the option and the fix) unless every given option fits ``sampler`` and a
    model trained with ``objective``; ``prefix`` names options as the user wrote them (``--``, ``model.sampling.``)."""
    given = {key: value for key, value in options.items() if value is not None}
    name = {key: f"{prefix}{key.replace('_', '-') if prefix == '--' else key}" for key in OPTIONS + ("steps",)}
    if sampler not in SAMPLERS:
        raise UserError(f"unknown {prefix}sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if objective in ("flow", "edm") and sampler in DISCRETE_SAMPLERS:
        raise UserError(f"{prefix}sampler {sampler!r} needs a DDPM-style model but this one uses the {objective} "
                        f"objective: use euler or heun")
    unknown = set(given) - set(OPTIONS) - {"steps"}
    if unknown:
        raise UserError(f"unknown sampling option(s) {sorted(unknown)}: use {', '.join(OPTIONS)}")
    if "steps" in given and (isinstance(given["steps"], bool) or given["steps"] < 1):
        raise UserError(f"{name['steps']} must be >= 1; got {given['steps']}")
    if "eta" in given:
        if objective == "flow" and sampler not in ETA_SAMPLERS[1:]:
            raise UserError(f"{name['eta']} sets DDIM / ancestral noise, which a flow model's {sampler} sampler has "
                            f"none of: leave out {name['eta']} or use euler_ancestral / dpmpp_2m_sde")
        if sampler not in ETA_SAMPLERS:
            raise UserError(f"{name['eta']} applies to the {', '.join(ETA_SAMPLERS)} samplers, not {sampler!r}: "
                            f"leave it out")
        if given["eta"] < 0:
            raise UserError(f"{name['eta']} must be >= 0 (0 = deterministic); got {given['eta']}")
    if "variance" in given and (sampler != "ddpm" or given["variance"] not in ("posterior", "beta")):
        raise UserError(f"{name['variance']} ('posterior' or 'beta') applies to the ddpm sampler only; "
                        f"got {given['variance']!r} with {sampler!r}")
    grid = given.get("grid", "karras")
    sigma_space = sampler in SIGMA_SAMPLERS and not _uses_flow_times(objective, sampler)
    if "grid" in given:
        if not sigma_space:
            raise UserError(f"{name['grid']} applies to the sigma-space samplers ({', '.join(SIGMA_SAMPLERS)}; "
                            f"not a flow model's euler / heun), not {sampler!r}: leave it out")
        if grid not in ("karras", "discrete") or (grid == "discrete" and objective in ("flow", "edm")):
            raise UserError(f"{name['grid']} must be 'karras' or (VP models) 'discrete'; got {grid!r}")
    if "spacing" in given:
        if given["spacing"] not in ("leading", "trailing", "linspace"):
            raise UserError(f"{name['spacing']} must be leading, trailing or linspace; got {given['spacing']!r}")
        if not (sampler in DISCRETE_SAMPLERS or (sigma_space and grid == "discrete")):
            raise UserError(f"{name['spacing']} spaces discrete timesteps (ddim, ddpm, or grid discrete), not "
                            f"{sampler!r} on the {grid if sigma_space else 'flow-time'} grid: leave it out")
    if "rho" in given and not (sigma_space and grid == "karras"):
        raise UserError(f"{name['rho']} shapes the karras sigma grid, which {sampler!r} does not use here: "
                        f"leave it out or use a sigma-space sampler with grid karras")
    if "rho" in given and given["rho"] <= 0:
        raise UserError(f"{name['rho']} must be > 0 (EDM uses 7); got {given['rho']}")
    if "s_churn" in given and (sampler != "edm" or given["s_churn"] < 0):
        raise UserError(f"{name['s_churn']} (>= 0) is the edm sampler's stochasticity; got {given['s_churn']} with "
                        f"{sampler!r}: use sampler edm or leave it out")
    if "threshold" in given and "clip" in given:
        raise UserError(f"{name['threshold']} and {name['clip']} both limit x0_hat: give one of them")
    if "threshold" in given and not 0 < given["threshold"] <= 1:
        raise UserError(f"{name['threshold']} is a percentile in (0, 1], e.g. 0.995; got {given['threshold']}")
    if "clip" in given and given["clip"] < 0:
        raise UserError(f"{name['clip']} must be >= 0 (0 = no clipping); got {given['clip']}")
    if "cfg_rescale" in given and not 0 <= given["cfg_rescale"] <= 1:
        raise UserError(f"{name['cfg_rescale']} must be in [0, 1] (0 = off, 0.7 in Lin et al.); "
                        f"got {given['cfg_rescale']}")


def resolve_options(objective: str, defaults: dict[str, Any], overrides: dict[str, Any],
                    prefix: str = "") -> dict[str, Any]:
    """The options one call samples with: the model's ``defaults`` (sampler, steps and its ``sampling`` group) where
    they fit the sampler in use, then the ``overrides``, which must fit (checked, naming them with ``prefix``)."""
    overrides = {key: value for key, value in overrides.items() if value is not None}
    sampler = overrides.get("sampler") or defaults["sampler"]
    check_options(objective, sampler, {k: v for k, v in overrides.items() if k != "sampler"}, prefix)
    merged = {"sampler": sampler}
    for key, value in defaults.items():
        if key == "sampler" or value is None:
            continue
        if key in ("threshold", "clip") and ({"threshold", "clip"} - {key}) & set(overrides):
            continue  # the other x0_hat limit was asked for
        try:
            check_options(objective, sampler, {key: value})
        except UserError:
            continue
        merged[key] = value
    merged.update({key: value for key, value in overrides.items() if key != "sampler"})
    check_options(objective, sampler, {k: v for k, v in merged.items() if k != "sampler"}, prefix)
    return merged


def build_denoiser(network: NetworkFn, objective: str, schedule: Any, options: dict[str, Any],
                   pixel: bool = True) -> SamplingDenoiser:
    """The sampler-facing denoiser with the options' x0_hat limit (pixel VP models clip to [-1, 1] by default)."""
    threshold, clip = options.get("threshold"), options.get("clip")
    if clip is None and threshold is None and pixel and objective in ("eps", "v", "x0"):
        clip = 1.0
    limit = (lambda x0: dynamic_threshold(x0, threshold)) if threshold is not None else None
    return SamplingDenoiser(network, objective, schedule, clip_x0=clip or None, threshold=limit)


def run_sampler(denoiser: SamplingDenoiser, shape: Sequence[int], options: dict[str, Any], generator: Generator,
                device: torch.device | str | None = None, progress: bool = False) -> Tensor:
    """Draw the start noise and run ``options['sampler']`` for ``options['steps']`` steps; returns x0 samples."""
    sampler, steps = options["sampler"], options["steps"]
    noise = initial_noise(shape, generator, device)
    if sampler in DISCRETE_SAMPLERS:
        timesteps = discrete_timesteps(denoiser.schedule.num_timesteps, steps, options.get("spacing") or "leading")
        if sampler == "ddim":
            return ddim_sample(denoiser, noise, timesteps, generator, eta=options.get("eta") or 0.0, progress=progress)
        return ddpm_sample(denoiser, noise, timesteps, generator, variance=options.get("variance") or "posterior",
                           progress=progress)
    if _uses_flow_times(denoiser.prediction, sampler):
        flow = flow_euler_sample if sampler == "euler" else flow_heun_sample
        return flow(denoiser, noise, flow_times(steps), generator, progress=progress)
    sigmas = sigma_grid(denoiser, steps, options.get("grid") or "karras", spacing=options.get("spacing") or "trailing",
                        rho=options.get("rho") or 7.0)
    extra: dict[str, Any] = {}
    if sampler in ETA_SAMPLERS and options.get("eta") is not None:
        extra["eta"] = options["eta"]
    if sampler == "edm":
        extra["s_churn"] = options.get("s_churn") or 0.0
    x = noise * denoiser.prior_scale(float(sigmas[0]))
    return SIGMA_SAMPLERS[sampler](denoiser, x, sigmas, generator, progress=progress, **extra)


def generate(model: Any, captions: list[str] | None = None, labels: Any = None, lowres: Tensor | None = None,
             num_samples: int | None = None, *, guidance: float | None = None, seed: int = 0, first_index: int = 0,
             progress: bool = False, model_wrapper: Callable[[NetworkFn], NetworkFn] | None = None,
             denoiser_wrapper: Callable[[SamplingDenoiser], SamplingDenoiser] | None = None,
             **overrides: Any) -> Tensor:
    """Images in [-1, 1] from a ``Denoiser`` (see ``Denoiser.generate``). Sample ``k`` of the call draws from the
    stream of global index ``first_index + k`` (``seeding.py``), so the same seed gives the same images whatever
    the batch size. ``model_wrapper`` wraps the (CFG-guided) network, ``denoiser_wrapper`` the denoiser (classifier
    guidance: ``lambda d: classifier_guided(d, log_prob, scale)``)."""
    from lightning_diffusion.diffusion.arguments import check_sampling

    hp = model.hparams
    guidance = model.val_guidance if guidance is None else guidance
    check_sampling(hp, guidance=guidance)
    defaults = {"sampler": hp.val_sampler, "steps": hp.val_steps, **(hp.get("sampling") or {})}
    options = resolve_options(hp.objective, defaults, overrides)
    condition = model.make_condition(captions, labels, lowres)
    sizes = [len(v) for v in (captions, labels, lowres) if v is not None]
    n = sizes[0] if sizes else num_samples
    if not n:
        raise UserError("nothing to sample: give captions, labels, low-res images or num_samples")
    if model.guidable:
        network = classifier_free_guidance(model.forward, condition, model.null.null_like(condition), guidance,
                                           options.get("cfg_rescale") or 0.0)
    else:
        def network(x: Tensor, t: Tensor) -> Tensor:
            return model(x, t, condition)
    if model_wrapper is not None:
        network = model_wrapper(network)
    denoiser = build_denoiser(network, hp.objective, model.schedule, options, pixel=hp.space == "pixel")
    if denoiser_wrapper is not None:
        denoiser = denoiser_wrapper(denoiser)
    generator = SampleGenerators.for_batch(seed, first_index, n, model.device)
    x = run_sampler(denoiser, (n, *model.sample_shape), options, generator, model.device, progress)
    return model.decode(x)


def add_sampling_arguments(parser: Any) -> None:
    """The ``sample`` / ``evaluate`` flags for every sampling option (default: the model's configured ones)."""
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help="ddim/ddpm: discrete VP steps; euler/heun: probability-flow ODE (flow models: flow ODE); "
                             "dpmpp_2m(_sde): DPM-Solver++, few steps; euler_ancestral; edm: Karras Alg. 2 "
                             "(default: the model's validation sampler)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--eta", type=float, default=None,
                        help="noise of ddim (0 = deterministic, 1 = DDPM), euler_ancestral and dpmpp_2m_sde "
                             "(default 1)")
    parser.add_argument("--variance", choices=("posterior", "beta"), default=None, help="ddpm: step variance")
    parser.add_argument("--spacing", choices=("leading", "trailing", "linspace"), default=None,
                        help="timestep spacing of ddim/ddpm (default leading) and of --grid discrete (trailing)")
    parser.add_argument("--grid", choices=("karras", "discrete"), default=None,
                        help="sigma grid of the sigma-space samplers: karras (default) or the schedule's steps")
    parser.add_argument("--rho", type=float, default=None,
                        help="karras grid: rho (default 7; larger = finer at low noise)")
    parser.add_argument("--s-churn", type=float, default=None,
                        help="edm sampler: S_churn, added noise (0 = ODE; 40-80)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="dynamic thresholding of x0_hat at this percentile (Imagen; e.g. 0.995)")
    parser.add_argument("--clip", type=float, default=None,
                        help="clip x0_hat to [-clip, clip] (default: 1 for pixel VP models; 0 = off)")
    parser.add_argument("--cfg-rescale", type=float, default=None,
                        help="CFG rescale phi (Lin et al. 2023; 0 = off, 0.7 suggested) for large --guidance")


def sampling_overrides(args: Any) -> dict[str, Any]:
    """The sampling flags given on the command line (None: not given), keyed as ``generate`` takes them."""
    return {key: getattr(args, key) for key in ("sampler", "steps") + OPTIONS if getattr(args, key, None) is not None}


def check_overrides(hparams: Any, overrides: dict[str, Any]) -> None:
    """Check command-line ``overrides`` against a denoiser's hparams before anything is generated or written."""
    defaults = {"sampler": hparams["val_sampler"], "steps": hparams["val_steps"], **(hparams.get("sampling") or {})}
    resolve_options(hparams["objective"], defaults, overrides, "--")
