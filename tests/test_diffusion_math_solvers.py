"""DPM-Solver++ and Euler ancestral against diffusers' schedulers step for step; those and EDM's stochastic sampler
(no diffusers counterpart) against the exact denoiser of Gaussian data; per-sample seeds; the sampling options'
checks; CFG rescale."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from lightning_diffusion.diffusion.denoisers import SamplingDenoiser, output_from_x0_eps
from lightning_diffusion.diffusion.guidance import classifier_free_guidance
from lightning_diffusion.diffusion.noise_grids import karras_sigmas, sigma_grid
from lightning_diffusion.diffusion.samplers import euler_sample
from lightning_diffusion.diffusion.sampling import check_options, resolve_options
from lightning_diffusion.diffusion.schedules import NoiseSchedule, make_schedule
from lightning_diffusion.diffusion.seeding import SampleGenerators, initial_noise
from lightning_diffusion.diffusion.solvers import (
    dpmpp_2m_sample, dpmpp_2m_sde_sample, edm_sample, euler_ancestral_sample,
)
from lightning_diffusion.errors import UserError

T = 1000
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
MU = torch.tensor([0.5, -1.0], dtype=torch.float64)  # Gaussian data N(MU, S^2 I) in 2-D
S = 0.3
N = 4000


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def exact_vp(schedule: NoiseSchedule, prediction: str):
    """The exact VP network of N(MU, S^2 I) in ``prediction``: eps* = (x_t - a MU) s / (a^2 S^2 + s^2)."""

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = schedule.alpha_bar(t).to(x).view(-1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        eps = (x - a * MU.to(x)) * s / (abar * S**2 + 1 - abar)
        return output_from_x0_eps(prediction, (x - s * eps) / a, eps, a, s)

    return network


def exact_edm(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """EDM's x0_hat(x, sigma) = E[x0 | x0 + sigma eps = x] for N(MU, S^2 I) data."""
    sigma = sigma.to(x).view(-1, 1)
    return MU.to(x) + S**2 / (S**2 + sigma**2) * (x - MU.to(x))


def exact_flow(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x1 - x0 | x_t] for x_t = t x1 + (1 - t) x0 (see test_diffusion_math_samplers.gaussian_velocity)."""
    t = t.to(x).view(-1, 1)
    var = t**2 * S**2 + (1 - t) ** 2
    return MU.to(x) + (t * S**2 - (1 - t)) * (x - t * MU.to(x)) / var


def x_T(seed: int, n: int = N) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_recovers_data(x: torch.Tensor, extra: float = 0.0) -> None:
    """Per-dimension mean and std within 5 Monte-Carlo standard errors (+ ``extra`` for a known bias)."""
    n = x.shape[0]
    assert (x.mean(0) - MU).abs().max().item() < 5 * S / n**0.5 + extra
    assert (x.std(0) - S).abs().max().item() < 5 * S / (2 * n) ** 0.5 + extra


# step for step against diffusers ------------------------------------------------------------------------------


def ve_trajectory(sampler, denoiser: SamplingDenoiser, start: torch.Tensor, sigmas: torch.Tensor, **kwargs):
    """The sampler's states after each step (EDM coordinates) and its result."""
    states: list[torch.Tensor] = []
    x = sampler(denoiser, start * denoiser.prior_scale(float(sigmas[0])), sigmas,
                callback=lambda i, x, x0: states.append(x.clone()), **kwargs)
    return states, x


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpm_solver_pp_2m_matches_diffusers_step_for_step(prediction: str, algorithm: str) -> None:
    schedule, steps = make_schedule("cosine"), 10
    network = exact_vp(schedule, prediction)
    reference = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                                            prediction_type=DIFFUSERS_PREDICTION[prediction], solver_order=2,
                                            algorithm_type=algorithm, timestep_spacing="trailing")
    reference.alphas_cumprod = schedule.alphas_cumprod.clone()  # float64, as in test_diffusion_math_samplers
    reference.set_timesteps(steps)
    start = x_T(1, 256)
    generator = torch.Generator().manual_seed(3)  # the SDE's draws, in the order our sampler makes them
    noises = [torch.randn(start.shape, generator=generator, dtype=torch.float64) for _ in range(steps - 1)]
    x, expected = start, []
    for t, sigma, noise in zip(reference.timesteps, reference.sigmas[1:], noises + [torch.zeros_like(start)]):
        x = reference.step(network(x, t.expand(len(x))), t, x, variance_noise=noise).prev_sample
        expected.append(x * math.sqrt(1 + float(sigma) ** 2))  # VP -> EDM coordinates

    denoiser = SamplingDenoiser(network, prediction, schedule)
    sigmas = sigma_grid(denoiser, steps, "discrete", spacing="trailing")
    torch.testing.assert_close(sigmas, reference.sigmas.double(), rtol=2e-6, atol=0)  # diffusers' are float32
    sampler = dpmpp_2m_sample if algorithm == "dpmsolver++" else dpmpp_2m_sde_sample
    states, got = ve_trajectory(sampler, denoiser, start, sigmas, generator=torch.Generator().manual_seed(3))
    assert len(states) == len(expected) == steps
    for i, (ours, theirs) in enumerate(zip(states, expected)):  # diffusers steps in float32 (float32 sigmas)
        scale = max(1.0, theirs.abs().max().item())
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * scale, msg=f"step {i}")
    torch.testing.assert_close(got, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_euler_ancestral_matches_diffusers_step_for_step(prediction: str) -> None:
    schedule, steps = make_schedule("linear"), 12
    network = exact_vp(schedule, prediction)
    reference = EulerAncestralDiscreteScheduler(num_train_timesteps=T, prediction_type=DIFFUSERS_PREDICTION[prediction],
                                                timestep_spacing="trailing")
    reference.set_timesteps(steps)
    start = x_T(2, 256)
    generator = torch.Generator().manual_seed(4)
    x, expected = start * reference.init_noise_sigma, []
    for t in reference.timesteps:
        model_input = reference.scale_model_input(x, t)
        x = reference.step(network(model_input, t.round().long().expand(len(x))), t, x, generator=generator).prev_sample
        expected.append(x)

    denoiser = SamplingDenoiser(network, prediction, schedule)
    sigmas = sigma_grid(denoiser, steps, "discrete", spacing="trailing")
    torch.testing.assert_close(sigmas, reference.sigmas.double(), rtol=2e-6, atol=0)  # diffusers' are float32
    states, got = ve_trajectory(euler_ancestral_sample, denoiser, start, sigmas,
                                generator=torch.Generator().manual_seed(4))
    for i, (ours, theirs) in enumerate(zip(states, expected)):  # diffusers steps in float32
        scale = max(1.0, theirs.abs().max().item())
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * scale, msg=f"step {i}")


# recovering a Gaussian with its exact denoiser ----------------------------------------------------------------


@pytest.mark.parametrize(("sampler", "steps", "kwargs", "extra"), [
    (dpmpp_2m_sample, 60, {}, 0.0),  # 15 steps: std 0.332 for 0.3 (a narrow Gaussian needs steps near sigma = S)
    (dpmpp_2m_sde_sample, 40, {}, 0.0),
    (euler_ancestral_sample, 100, {}, 0.01),  # first-order SDE: 100 steps leave a std bias of ~0.5 %
    (edm_sample, 60, {"s_churn": 40.0}, 0.0),
    (edm_sample, 60, {}, 0.0),
])
def test_sigma_samplers_recover_gaussian_data_with_the_exact_edm_denoiser(sampler, steps, kwargs, extra) -> None:
    denoiser = SamplingDenoiser(exact_edm, "edm")
    sigmas = sigma_grid(denoiser, steps, "karras")
    generator = torch.Generator().manual_seed(5)
    x = sampler(denoiser, x_T(6) * denoiser.prior_scale(float(sigmas[0])), sigmas, generator, **kwargs)
    assert_recovers_data(x, extra)


def test_dpm_solver_pp_is_second_order() -> None:
    """For N(MU, S^2) data the probability-flow ODE has the solution x - MU = C sqrt(S^2 + sigma^2); the grid's last
    step jumps from sigma_min to 0 with x0_hat, so the reference is that map applied to the exact x(sigma_min)."""
    denoiser = SamplingDenoiser(exact_edm, "edm")
    x_start = x_T(7, 64) * 80.0
    low = 0.002
    at_low = MU + (x_start - MU) * math.sqrt(S**2 + low**2) / math.sqrt(S**2 + 80.0**2)
    exact = MU + S**2 / (S**2 + low**2) * (at_low - MU)
    error = {}
    for steps in (40, 80):
        sigmas = torch.cat([karras_sigmas(low, 80.0, steps), torch.zeros(1, dtype=torch.float64)])
        error[steps] = (dpmpp_2m_sample(denoiser, x_start, sigmas) - exact).abs().max().item()
        error["euler", steps] = (euler_sample(denoiser, x_start, sigmas) - exact).abs().max().item()
    assert error[40] / error[80] > 3.5, error  # second order (measured 4.4)
    assert 1.7 < error["euler", 40] / error["euler", 80] < 2.3, error  # first order, same evaluations
    assert error[80] < error["euler", 80] / 10, error


def test_flow_and_vp_models_sample_through_the_sigma_samplers() -> None:
    flow = SamplingDenoiser(exact_flow, "flow")
    sigmas = sigma_grid(flow, 60, "karras")
    assert_recovers_data(dpmpp_2m_sample(flow, x_T(8) * flow.prior_scale(float(sigmas[0])), sigmas))
    schedule = make_schedule("cosine")
    for prediction in ("eps", "v", "x0"):
        vp = SamplingDenoiser(exact_vp(schedule, prediction), prediction, schedule)
        sigmas = sigma_grid(vp, 60, "karras")
        assert_recovers_data(dpmpp_2m_sample(vp, x_T(9) * vp.prior_scale(float(sigmas[0])), sigmas))


# per-sample seeds ---------------------------------------------------------------------------------------------


def test_sample_generators_give_each_sample_its_own_stream_whatever_the_batching() -> None:
    def draws(batch: int) -> torch.Tensor:
        out = []
        for first in range(0, 6, batch):
            generators = SampleGenerators.for_batch(11, first, batch)
            start = initial_noise((batch, 3, 4, 4), generators)
            out.append(torch.cat([start, generators.randn((batch, 3, 4, 4))], dim=1))  # start + one later draw
        return torch.cat(out)

    one, two, three = draws(1), draws(2), draws(3)
    assert torch.equal(one, two) and torch.equal(one, three)
    assert not torch.equal(one[0], one[1])
    assert not torch.equal(one, torch.cat([initial_noise((1, 6, 4, 4), SampleGenerators.for_batch(12, i, 1))
                                           for i in range(6)]))


def test_generate_gives_the_same_ith_sample_for_any_batch_size_and_rank_split(tmp_path) -> None:
    from lightning_diffusion.diffusion.module import Denoiser

    torch.manual_seed(0)
    model = Denoiser(image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                     num_heads=1, conditioning="none", ema_decay=None, num_timesteps=50, val_steps=4).eval()
    for options in ({"sampler": "ddpm"}, {"sampler": "euler_ancestral"}, {"sampler": "edm", "s_churn": 10.0}):
        whole = model.generate(num_samples=6, seed=3, **options)
        halves = torch.cat([model.generate(num_samples=3, seed=3, first_index=i, **options) for i in (0, 3)])
        pairs = torch.cat([model.generate(num_samples=2, seed=3, first_index=i, **options) for i in (0, 2, 4)])
        # exactly equal on the CPU (one thread); other backends may pick batch-size-dependent kernels
        assert torch.equal(halves, whole) and torch.equal(pairs, whole), options
        assert (model.generate(num_samples=6, seed=4, **options) - whole).abs().max() > 0.1


# options ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("objective", "sampler", "options", "message"), [
    ("flow", "euler", {"eta": 0.5}, "--eta"),
    ("eps", "ddim", {"rho": 5.0}, "--rho shapes the karras sigma grid"),
    ("eps", "dpmpp_2m", {"grid": "discrete", "rho": 5.0}, "--rho"),
    ("eps", "ddim", {"s_churn": 40.0}, "--s-churn"),
    ("eps", "heun", {"spacing": "trailing"}, "--spacing"),
    ("eps", "ddim", {"threshold": 0.995, "clip": 1.0}, "give one of them"),
    ("eps", "ddim", {"threshold": 99.5}, "percentile"),
    ("edm", "dpmpp_2m", {"grid": "discrete"}, "--grid"),
    ("eps", "ddpm", {"eta": 0.5}, "--eta"),
    ("eps", "ddim", {"variance": "beta"}, "--variance"),
    ("eps", "ddim", {"cfg_rescale": 1.5}, "--cfg-rescale"),
    ("flow", "ddim", {}, "needs a DDPM-style model"),
    ("eps", "plms", {}, "unknown --sampler"),
])
def test_bad_option_combinations_are_user_errors(objective: str, sampler: str, options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("-", r"\-")):
        check_options(objective, sampler, options, "--")


def test_configured_defaults_apply_where_they_fit_and_explicit_options_must_fit() -> None:
    defaults = {"sampler": "edm", "steps": 20, "s_churn": 40.0, "rho": 5.0, "clip": 1.0}
    assert resolve_options("eps", defaults, {}) == {"sampler": "edm", "steps": 20, "s_churn": 40.0, "rho": 5.0,
                                                    "clip": 1.0}
    # switching to ddim drops the edm-only defaults; an explicit threshold replaces the configured clip
    assert resolve_options("eps", defaults, {"sampler": "ddim", "threshold": 0.99, "eta": 0.5}) == {
        "sampler": "ddim", "steps": 20, "threshold": 0.99, "eta": 0.5}
    with pytest.raises(UserError, match="s_churn"):
        resolve_options("eps", defaults, {"sampler": "ddim", "s_churn": 1.0})


# CFG rescale --------------------------------------------------------------------------------------------------


def test_cfg_rescale_matches_diffusers_guidance_rescale() -> None:
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(3, 2, 4, 4, generator=generator)
    t = torch.tensor([10, 500, 900])
    cond, null = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0])

    def model(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * c.view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000

    conditional, unconditional = model(x, t, cond), model(x, t, null.expand(3))
    guided = unconditional + 5.0 * (conditional - unconditional)
    for phi in (0.0, 0.7, 1.0):
        ours = classifier_free_guidance(model, cond, null, 5.0, rescale=phi)(x, t)
        torch.testing.assert_close(ours, rescale_noise_cfg(guided, conditional, guidance_rescale=phi))


# zero terminal SNR (Lin et al. 2023) --------------------------------------------------------------------------


def exact_v(schedule: NoiseSchedule):
    """The exact v-network of N(MU, S^2 I), also at abar = 0: x0* = MU + a S^2 (x_t - a MU) / (a^2 S^2 + s^2)."""

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = schedule.alpha_bar(t).to(x).view(-1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x0 = MU.to(x) + a * S**2 * (x - a * MU.to(x)) / (abar * S**2 + 1 - abar)
        return a * (x - a * x0) / s - s * x0

    return network


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_zero_terminal_snr_schedule_matches_diffusers_and_trailing_ddim_matches_its_loop(name: str) -> None:
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    from lightning_diffusion.diffusion.noise_grids import discrete_timesteps
    from lightning_diffusion.diffusion.samplers import ddim_sample, ddpm_sample

    plain, schedule = make_schedule(name), make_schedule(name, zero_terminal_snr=True)
    torch.testing.assert_close(schedule.betas, rescale_zero_terminal_snr(plain.betas.clone()), rtol=0, atol=1e-12)
    assert schedule.alphas_cumprod[-1] == 0
    assert schedule.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)

    network, steps = exact_v(schedule), 10
    diffusers_name = "linear" if name == "linear" else "squaredcos_cap_v2"
    reference = DDIMScheduler(num_train_timesteps=T, beta_schedule=diffusers_name,
                              clip_sample=False, set_alpha_to_one=True, prediction_type="v_prediction",
                              timestep_spacing="trailing", rescale_betas_zero_snr=True)
    reference.alphas_cumprod = schedule.alphas_cumprod.clone()
    reference.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    reference.set_timesteps(steps)
    start = x_T(10, 64)
    x = start
    for t in reference.timesteps:
        x = reference.step(network(x, t.expand(len(x))), t, x, eta=0.0).prev_sample
    denoiser = SamplingDenoiser(network, "v", schedule)
    timesteps = discrete_timesteps(T, steps, "trailing")
    assert timesteps[0] == T - 1  # the first step is at zero SNR: pure noise, as the sampler's start
    torch.testing.assert_close(ddim_sample(denoiser, start, timesteps), x, rtol=0, atol=1e-10)
    generator = torch.Generator().manual_seed(11)
    assert_recovers_data(ddpm_sample(denoiser, x_T(12), discrete_timesteps(T, T), generator))
    sigmas = sigma_grid(denoiser, 60, "discrete", spacing="trailing")
    assert torch.isfinite(sigmas).all()  # sigma-space samplers start at the largest finite level
    assert_recovers_data(dpmpp_2m_sample(denoiser, x_T(13) * denoiser.prior_scale(float(sigmas[0])), sigmas), 0.01)


def test_zero_terminal_snr_needs_a_v_or_x0_model() -> None:
    from lightning_diffusion.diffusion.module import Denoiser

    with pytest.raises(UserError, match="model.zero_terminal_snr needs model.objective v"):
        Denoiser(image_size=8, conditioning="none", objective="eps", zero_terminal_snr=True)


def test_the_model_sampling_group_sets_generate_defaults_and_is_checked() -> None:
    from lightning_diffusion.diffusion.module import Denoiser

    tiny = dict(image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                num_heads=1, conditioning="none", ema_decay=None, num_timesteps=50, val_steps=3)
    with pytest.raises(UserError, match="model.sampling.s_churn"):
        Denoiser(**tiny, val_sampler="ddim", sampling={"s_churn": 40.0})
    torch.manual_seed(0)
    model = Denoiser(**tiny, val_sampler="edm", sampling={"s_churn": 40.0}).eval()
    configured = model.generate(num_samples=2, seed=1)
    torch.testing.assert_close(configured, model.generate(num_samples=2, seed=1, s_churn=40.0))
    assert not torch.equal(configured, model.generate(num_samples=2, seed=1, s_churn=0.0))
    model.generate(num_samples=2, seed=1, sampler="ddim")  # the edm-only default is left out for ddim
