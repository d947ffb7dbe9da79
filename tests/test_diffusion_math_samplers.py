"""Samplers against diffusers' schedulers and against the exact denoiser of a Gaussian data distribution."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

from lightning_diffusion.diffusion.denoisers import SamplingDenoiser, output_from_x0_eps
from lightning_diffusion.diffusion.noise_grids import discrete_timesteps as ddim_timesteps
from lightning_diffusion.diffusion.noise_grids import flow_times, sigma_grid
from lightning_diffusion.diffusion.samplers import (
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    euler_sample,
    flow_euler_sample,
    flow_heun_sample,
    heun_sample,
)
from lightning_diffusion.diffusion.seeding import initial_noise
from lightning_diffusion.diffusion.schedules import NoiseSchedule, make_schedule
from lightning_diffusion.errors import UserError

T = 1000
DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
MU = torch.tensor([0.5, -1.0], dtype=torch.float64)  # Gaussian data N(MU, S^2 I) in 2-D
S = 0.3
N = 4000


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These are thousands of tiny ops: one thread is 5-7x faster than two on the shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def exact_eps(schedule: NoiseSchedule, prediction: str = "eps"):
    """The exact denoiser of N(MU, S^2 I): eps*(x_t, t) = (x_t - a MU) s_t / (a^2 S^2 + s_t^2), in ``prediction``."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = schedule.alpha_bar(t).to(x).view(-1, 1)
        a, s_t = abar.sqrt(), (1 - abar).sqrt()
        mu = MU.to(x)
        eps = (x - a * mu) * s_t / (abar * S**2 + 1 - abar)
        x0 = (x - s_t * eps) / a
        return output_from_x0_eps(prediction, x0, eps, a, s_t)

    return model_fn


def fixed(output: torch.Tensor, prediction: str, schedule: NoiseSchedule, **kwargs) -> SamplingDenoiser:
    """A denoiser whose network returns ``output`` whatever its input: single steps against diffusers."""
    return SamplingDenoiser(lambda x, t: output, prediction, schedule, **kwargs)


def vp(model_fn, schedule: NoiseSchedule, prediction: str = "eps", **kwargs) -> SamplingDenoiser:
    return SamplingDenoiser(model_fn, prediction, schedule, **kwargs)


def probability_flow(model_fn, schedule: NoiseSchedule, prediction: str, steps: int, method: str, start: torch.Tensor,
                     discrete: bool = True, **grid) -> torch.Tensor:
    """The probability-flow ODE from ``start ~ N(0, I)`` (VP scale) at the grid's first level."""
    denoiser = vp(model_fn, schedule, prediction, discrete=discrete)
    sigmas = sigma_grid(denoiser, steps, **grid)
    sampler = heun_sample if method == "heun" else euler_sample
    return sampler(denoiser, start * denoiser.prior_scale(float(sigmas[0])), sigmas)


def pf_sigmas(schedule: NoiseSchedule, steps: int, quantize: bool = True, **grid) -> torch.Tensor:
    return sigma_grid(vp(None, schedule, discrete=quantize), steps, **grid)


def in_float64(scheduler: DDPMScheduler | DDIMScheduler, schedule: NoiseSchedule):
    """The diffusers scheduler with its step formulas but our float64 ``abar`` (checked against its betas and the
    closed forms in test_diffusion_math_schedules). Stock diffusers forms ``1 - abar_t / abar_{t-1}`` in float32,
    which loses 1.5e-4 absolute on x_{t-1} at t = 1 by cancellation, and its float32 betas shift abar_999 by 1e-5."""
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.one = scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def assert_recovers_data(x: torch.Tensor, std: float = S, extra: float = 0.0) -> None:
    """Per-dimension mean and std within 5 Monte-Carlo standard errors (+ ``extra`` for a known bias)."""
    n = x.shape[0]
    assert (x.mean(0) - MU.to(x)).abs().max().item() < 5 * std / n**0.5 + extra
    assert (x.std(0) - std).abs().max().item() < 5 * std / (2 * n) ** 0.5 + extra


def x_T(seed: int = 0, n: int = N) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# timesteps ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_timesteps_equal_diffusers_set_timesteps(spacing: str) -> None:
    reference = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    for steps in (1, 3, 7, 10, 25, 50, 100, 333, 999, 1000):
        reference.set_timesteps(steps)
        assert ddim_timesteps(T, steps, spacing) == reference.timesteps.tolist(), steps


def test_bad_step_counts_are_user_errors() -> None:
    with pytest.raises(UserError, match="steps"):
        ddim_timesteps(T, 0)
    with pytest.raises(UserError, match="steps"):
        ddim_timesteps(T, T + 1)


# single steps against diffusers -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_step_matches_diffusers(name: str, prediction: str, variance: str, monkeypatch) -> None:
    reference = in_float64(DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name], clip_sample=False,
                                         prediction_type=DIFFUSERS_PREDICTION[prediction],
                                         variance_type="fixed_small" if variance == "posterior" else "fixed_large"),
                           schedule := make_schedule(name))
    generator = torch.Generator().manual_seed(10)
    for t in (999, 700, 300, 20, 1, 0):
        x_t, output, noise = torch.randn(3, 2, 3, 8, 8, generator=generator)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *args, **kwargs: noise.double())
        expected = reference.step(output.double(), t, x_t.double()).prev_sample
        got = ddpm_step(fixed(output, prediction, schedule), x_t, t, variance=variance, noise=noise)[0].double()
        # eps -> x0 divides by sqrt(abar_999) = 5e-5 for the cosine schedule (|x| ~ 100): compare relative to scale
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(name: str, prediction: str, eta: float) -> None:
    steps = 50
    reference = in_float64(DDIMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name], clip_sample=False,
                                         set_alpha_to_one=True, prediction_type=DIFFUSERS_PREDICTION[prediction]),
                           schedule := make_schedule(name))
    reference.set_timesteps(steps)
    generator = torch.Generator().manual_seed(11)
    for t in (980, 500, 20, 0):
        x_t, output, noise = torch.randn(3, 2, 3, 8, 8, generator=generator)
        expected = reference.step(output.double(), t, x_t.double(), eta=eta, variance_noise=noise.double()).prev_sample
        t_prev = t - T // steps if t >= T // steps else -1
        got = ddim_step(fixed(output, prediction, schedule), x_t, t, t_prev, eta=eta, noise=noise)[0].double()
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * scale)


def test_clipped_and_thresholded_x0_match_diffusers(monkeypatch) -> None:
    from lightning_diffusion.diffusion.guidance import dynamic_threshold

    schedule = make_schedule("linear")
    generator = torch.Generator().manual_seed(12)
    x_t, output, noise = torch.randn(3, 4, 3, 8, 8, generator=generator) * 2
    t = 400
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *args, **kwargs: noise)
    clipped = DDPMScheduler(num_train_timesteps=T, clip_sample=True).step(output, t, x_t).prev_sample
    torch.testing.assert_close(ddpm_step(fixed(output, "eps", schedule, clip_x0=1.0), x_t, t, noise=noise)[0], clipped)
    thresholded = DDPMScheduler(num_train_timesteps=T, thresholding=True, sample_max_value=1e9,
                                dynamic_thresholding_ratio=0.9).step(output, t, x_t).prev_sample
    ours = ddpm_step(fixed(output, "eps", schedule, threshold=lambda x0: dynamic_threshold(x0, 0.9)), x_t, t,
                     noise=noise)[0]
    torch.testing.assert_close(ours, thresholded)
    ddim = DDIMScheduler(num_train_timesteps=T, clip_sample=True, set_alpha_to_one=True)
    ddim.set_timesteps(50)
    expected = ddim.step(output, t, x_t, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(ddim_step(fixed(output, "eps", schedule, clip_x0=1.0), x_t, t, t - 20)[0], expected)


# whole loops against diffusers --------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sample_matches_diffusers_loop(eta: float) -> None:
    schedule, steps = make_schedule("cosine"), 50
    model_fn = exact_eps(schedule)
    start = x_T(1, 64)
    reference = in_float64(DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                         set_alpha_to_one=True), schedule)
    reference.set_timesteps(steps)
    generator = torch.Generator().manual_seed(5)
    x = start
    for t in reference.timesteps:
        x = reference.step(model_fn(x, t.expand(len(x))), t, x, eta=eta, generator=generator).prev_sample
    got = ddim_sample(vp(model_fn, schedule), start, ddim_timesteps(T, steps), torch.Generator().manual_seed(5),
                      eta=eta)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)


def test_ddpm_sample_matches_diffusers_loop() -> None:
    schedule = make_schedule("linear")
    model_fn = exact_eps(schedule, "v")
    start = x_T(2, 64)
    reference = DDPMScheduler(num_train_timesteps=T, clip_sample=False, prediction_type="v_prediction")
    reference = in_float64(reference, schedule)
    generator = torch.Generator().manual_seed(6)
    x = start
    for t in reference.timesteps:
        x = reference.step(model_fn(x, t.expand(len(x))), t, x, generator=generator).prev_sample
    got = ddpm_sample(vp(model_fn, schedule, "v"), start, list(range(T - 1, -1, -1)), torch.Generator().manual_seed(6))
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)


# determinism --------------------------------------------------------------------------------------------------


def test_ddim_eta0_is_deterministic_and_seeds_fix_stochastic_samplers() -> None:
    schedule = make_schedule("linear")
    model_fn = exact_eps(schedule)
    start = x_T(3, 16).float()
    denoiser, steps20, steps50 = vp(model_fn, schedule), ddim_timesteps(T, 20), ddim_timesteps(T, 50)
    first = ddim_sample(denoiser, start, steps20)
    assert torch.equal(first, ddim_sample(denoiser, start, steps20))
    for sampler in (lambda g: ddim_sample(denoiser, initial_noise((16, 2), g), steps20, g, eta=1.0),
                    lambda g: ddpm_sample(denoiser, initial_noise((16, 2), g), steps50, g)):
        a, b, c = (sampler(torch.Generator().manual_seed(seed)) for seed in (7, 7, 8))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_respaced_ddpm_is_ddim_with_eta_one_on_the_same_timesteps() -> None:
    """With beta_t = 1 - abar_t / abar_prev the respaced posterior step is DDIM's eta = 1 step (Song et al. 2021)."""
    schedule = make_schedule("cosine")
    model_fn = exact_eps(schedule, "x0")
    start = x_T(4, 64)
    denoiser, steps = vp(model_fn, schedule, "x0"), ddim_timesteps(T, 20, "trailing")
    ddpm = ddpm_sample(denoiser, start, steps, torch.Generator().manual_seed(9))
    ddim = ddim_sample(denoiser, start, steps, torch.Generator().manual_seed(9), eta=1.0)
    torch.testing.assert_close(ddpm, ddim, rtol=0, atol=1e-12)


def test_low_precision_model_outputs_keep_a_float32_state_and_progress_bars_run(capsys) -> None:
    schedule = make_schedule("linear")

    def bf16_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return exact_eps(schedule)(x, t).bfloat16()

    start = x_T(5, 8).float()
    denoiser, steps = vp(bf16_model, schedule), ddim_timesteps(T, 5)
    sigmas = sigma_grid(denoiser, 5)
    flow = SamplingDenoiser(lambda x, t: gaussian_velocity(x, t).bfloat16(), "flow")
    for x in (ddim_sample(denoiser, start, steps, progress=True),
              ddpm_sample(denoiser, start, steps, progress=True),
              heun_sample(denoiser, start * denoiser.prior_scale(float(sigmas[0])), sigmas, progress=True),
              flow_heun_sample(flow, start, flow_times(5), progress=True)):
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert "DDIM" in capsys.readouterr().err


# recovering a Gaussian with its exact denoiser ----------------------------------------------------------------


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_recovers_gaussian_data(variance: str) -> None:
    schedule = make_schedule("linear")
    generator = torch.Generator().manual_seed(20)
    x = ddpm_sample(vp(exact_eps(schedule), schedule), initial_noise((N, 2), generator, dtype=torch.float64),
                    list(range(T - 1, -1, -1)), generator, variance=variance)
    assert_recovers_data(x)


def ddim_moments(schedule: NoiseSchedule, steps: int, eta: float) -> tuple[torch.Tensor, float]:
    """Exact mean and std after DDIM with the exact denoiser: each step is affine in x plus independent noise."""
    ts = ddim_timesteps(T, steps) + [-1]
    mean, var = torch.zeros(2, dtype=torch.float64), 1.0
    for t, t_prev in zip(ts[:-1], ts[1:]):
        a = schedule.alphas_cumprod[t].item()
        a_prev = schedule.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
        k = math.sqrt(1 - a) / (a * S**2 + 1 - a)  # eps = k (x - sqrt(a) MU)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        gain = math.sqrt(a_prev / a) * (1 - math.sqrt(1 - a) * k) + math.sqrt(1 - a_prev - sigma**2) * k
        offset = (math.sqrt(a_prev / a) * math.sqrt(1 - a) - math.sqrt(1 - a_prev - sigma**2)) * k * math.sqrt(a)
        mean, var = gain * mean + offset * MU, gain**2 * var + sigma**2
    return mean, math.sqrt(var)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_50_steps_has_the_exact_moments_and_converges_to_the_data(eta: float) -> None:
    schedule = make_schedule("linear")
    model_fn = exact_eps(schedule)
    denoiser = vp(model_fn, schedule)
    x = ddim_sample(denoiser, x_T(21), ddim_timesteps(T, 50), torch.Generator().manual_seed(1), eta=eta)
    mean, std = ddim_moments(schedule, 50, eta)
    assert (x.mean(0) - mean).abs().max().item() < 5 * std / N**0.5
    assert (x.std(0) - std).abs().max().item() < 5 * std / (2 * N) ** 0.5
    # 50 steps shrink this narrow Gaussian's std (0.2750 at eta = 0, 0.2530 at eta = 1, for 0.3): the
    # discretisation, not the code, since the sampler matches the exact moments above; the limit is the data
    assert abs(std - S) / S < (0.1 if eta == 0 else 0.2)
    assert abs(ddim_moments(schedule, T, eta)[1] - S) / S < 0.02  # 0.2985 at eta = 0, 0.2963 at eta = 1
    assert_recovers_data(ddim_sample(denoiser, x_T(22), ddim_timesteps(T, T), torch.Generator().manual_seed(2),
                                     eta=eta))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_probability_flow_heun_recovers_gaussian_data(prediction: str) -> None:
    schedule = make_schedule("cosine")
    x = probability_flow(exact_eps(schedule, prediction), schedule, prediction, 60, "heun", x_T(23).float())
    assert_recovers_data(x)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_probability_flow_converges_at_first_and_second_order_and_euler_on_timesteps_is_ddim(name: str) -> None:
    """For N(MU, S^2) data the ODE in (z, sigma) has the closed-form solution z - MU = C sqrt(S^2 + sigma^2)."""
    schedule = make_schedule(name)
    model_fn = exact_eps(schedule)
    start = x_T(24)
    error = {}
    for method in ("euler", "heun"):
        for steps in (50, 100):
            sigma_top = pf_sigmas(schedule, steps)[0].item()
            exact = MU + (start * math.sqrt(1 + sigma_top**2) - MU) * S / math.sqrt(S**2 + sigma_top**2)
            x = probability_flow(model_fn, schedule, "eps", steps, method, start)
            error[method, steps] = (x - exact).abs().max().item()
    assert 1.7 < error["euler", 50] / error["euler", 100] < 2.3  # first order
    assert error["heun", 50] / error["heun", 100] > 3.5  # second order
    assert error["heun", 50] < error["euler", 50] / 5
    euler = probability_flow(model_fn, schedule, "eps", 25, "euler", start, grid="discrete", spacing="leading")
    ddim = ddim_sample(vp(model_fn, schedule), start, ddim_timesteps(T, 25))
    torch.testing.assert_close(euler, ddim, rtol=0, atol=1e-10)


def test_probability_flow_sigma_grids() -> None:
    schedule = make_schedule("linear")
    karras = pf_sigmas(schedule, 10, quantize=False, sigma_max=None)
    assert len(karras) == 11 and karras[-1] == 0
    assert karras[0].item() == pytest.approx(schedule.sigmas[-1].item())
    assert pf_sigmas(schedule, 10, quantize=False)[0].item() == pytest.approx(80.0)
    assert karras[-2].item() == pytest.approx(schedule.sigmas[0].item())
    quantized = pf_sigmas(schedule, 10)
    ts = schedule.sigma_to_t(quantized[:-1])
    torch.testing.assert_close(ts, ts.round(), rtol=0, atol=1e-9)
    assert bool((quantized.diff() < 0).all())
    steps = pf_sigmas(schedule, 10, grid="discrete", spacing="trailing")
    torch.testing.assert_close(steps[:-1], schedule.sigmas[ddim_timesteps(T, 10, "trailing")])


def test_probability_flow_passes_float_timesteps_when_not_quantized() -> None:
    schedule = make_schedule("linear")
    seen = []

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return exact_eps(schedule)(x, t)

    x = probability_flow(model_fn, schedule, "eps", 40, "heun", x_T(25).float(), discrete=False)
    assert all(t.is_floating_point() for t in seen) and len(seen) == 2 * 40 - 1
    assert any((t != t.round()).any() for t in seen)
    assert_recovers_data(x)


# flow matching ------------------------------------------------------------------------------------------------


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x1 - x0 | x_t] for x_t = t x1 + (1 - t) x0, x0 ~ N(0, I), x1 ~ N(MU, S^2 I).

    Var x_t = t^2 S^2 + (1 - t)^2 =: V, Cov(x1, x_t) = t S^2, Cov(x0, x_t) = 1 - t, so
    v = MU + (t S^2 - (1 - t)) (x_t - t MU) / V.
    """
    t = t.to(x).view(-1, 1)
    mu = MU.to(x)
    var = t**2 * S**2 + (1 - t) ** 2
    return mu + (t * S**2 - (1 - t)) * (x - t * mu) / var


def test_flow_samplers_land_on_the_gaussian_target_at_first_and_second_order() -> None:
    start = x_T(26)
    flow = SamplingDenoiser(gaussian_velocity, "flow")
    exact = MU + S * start  # the ODE's solution: x_t = t MU + sqrt(V_t) x_0
    error = {}
    for name, sampler in (("euler", flow_euler_sample), ("heun", flow_heun_sample)):
        for steps in (20, 40):
            error[name, steps] = (sampler(flow, start, flow_times(steps)) - exact).abs().max().item()
        noise = initial_noise((N, 2), torch.Generator().manual_seed(3), dtype=torch.float64)
        assert_recovers_data(sampler(flow, noise, flow_times(50)))
    assert 1.7 < error["euler", 20] / error["euler", 40] < 2.3
    assert error["heun", 20] / error["heun", 40] > 3.5
    assert error["heun", 20] < error["euler", 20] / 10
