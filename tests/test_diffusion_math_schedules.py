"""Noise schedules and training objectives against closed forms, Monte Carlo and diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from lightning_diffusion.diffusion.objectives import (
    diffusion_loss,
    flow_interpolate,
    flow_velocity_target,
    min_snr_weight,
    sample_flow_time,
    to_x0_eps,
    training_target,
)
from lightning_diffusion.diffusion.schedules import NoiseSchedule, make_schedule
from lightning_diffusion.errors import UserError

T = 1000
DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def test_linear_alphas_cumprod_is_cumprod_of_linspace_betas() -> None:
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    schedule = NoiseSchedule.linear()
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=0, atol=1e-15)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)


def test_cosine_alphas_cumprod_is_f_ratio_where_unclipped_and_betas_clip_at_0999() -> None:
    s = 0.008
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    schedule = NoiseSchedule.cosine()
    betas = schedule.betas.numpy()
    unclipped = np.cumprod(betas < 0.999) == 1  # every step up to here below the cap
    assert unclipped.sum() == T - 1  # only the last step (f(T) = 0 would give beta = 1) is clipped
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy()[unclipped], (f[1:] / f[0])[unclipped], rtol=1e-10)
    assert betas[-1] == 0.999 and betas.max() == 0.999
    assert schedule.alphas_cumprod[-1] == pytest.approx(schedule.alphas_cumprod[-2].item() * 0.001, rel=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_betas_match_diffusers(name: str) -> None:
    reference = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name])
    ours = make_schedule(name, T)
    torch.testing.assert_close(ours.betas.float(), reference.betas, rtol=0, atol=1e-7)
    # diffusers accumulates the product in float32: 1.3e-5 relative drift by the cosine schedule's last step
    torch.testing.assert_close(ours.alphas_cumprod.float(), reference.alphas_cumprod, rtol=5e-5, atol=0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_signal_and_noise_rates_lie_on_the_unit_circle(name: str) -> None:
    schedule = make_schedule(name)
    t = torch.arange(-1, T)
    signal, noise = schedule.signal_noise(t, torch.zeros(T + 1, 3, dtype=torch.float64))
    assert signal.shape == (T + 1, 1)
    torch.testing.assert_close(signal**2 + noise**2, torch.ones_like(signal), rtol=0, atol=1e-14)
    assert signal[0].item() == 1 and noise[0].item() == 0  # t = -1 is clean data
    assert bool((signal[1:].diff(dim=0) < 0).all())  # signal falls monotonically


def test_signal_noise_follow_the_like_tensor() -> None:
    schedule = make_schedule("linear")
    like = torch.zeros(4, 3, 8, 8, dtype=torch.float16)
    signal, noise = schedule.signal_noise(torch.tensor([0, 1, 2, 999]), like)
    assert signal.shape == noise.shape == (4, 1, 1, 1)
    assert signal.dtype == noise.dtype == torch.float16
    signal, _ = schedule.signal_noise(10, like)
    assert signal.shape == (1, 1, 1, 1)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_moments_by_monte_carlo(name: str) -> None:
    schedule = make_schedule(name)
    generator = torch.Generator().manual_seed(0)
    n = 40_000
    x0 = torch.tensor([1.5, -0.5, 0.0, 0.8], dtype=torch.float64)
    for step in (0, 50, 300, 700, 999):
        abar = schedule.alphas_cumprod[step].item()
        eps = torch.randn(n, 4, generator=generator, dtype=torch.float64)
        x_t = schedule.add_noise(x0.expand(n, 4), eps, torch.full((n,), step))
        mean, var = x_t.mean(0), x_t.var(0)
        mean_tol = 5 * math.sqrt((1 - abar) / n)
        var_tol = 5 * (1 - abar) * math.sqrt(2 / n)
        assert (mean - math.sqrt(abar) * x0).abs().max().item() < mean_tol, step
        assert (var - (1 - abar)).abs().max().item() < var_tol, step


def test_fractional_timesteps_interpolate_log_sigma() -> None:
    schedule = make_schedule("cosine")
    integer = torch.arange(T, dtype=torch.float64)
    torch.testing.assert_close(schedule.t_to_sigma(integer), schedule.sigmas, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.alpha_bar(integer), schedule.alphas_cumprod, rtol=1e-12, atol=0)
    t = torch.rand(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (T - 1)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    low, high = t.floor().long(), t.ceil().long()
    halfway = torch.tensor([10.5], dtype=torch.float64)
    expected = math.exp(0.5 * (schedule.log_sigmas[10] + schedule.log_sigmas[11]).item())
    assert schedule.t_to_sigma(halfway).item() == pytest.approx(expected, rel=1e-12)
    abar = schedule.alpha_bar(t)
    assert bool(((abar <= schedule.alphas_cumprod[low]) & (abar >= schedule.alphas_cumprod[high])).all())


def test_unknown_schedule_is_a_user_error() -> None:
    with pytest.raises(UserError, match="schedule"):
        make_schedule("quadratic", T)  # type: ignore[arg-type]


# objectives ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_training_target_round_trips_through_to_x0_eps(name: str, prediction: str) -> None:
    schedule = make_schedule(name)
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t = schedule.add_noise(x0, eps, t)
    x0_hat, eps_hat = to_x0_eps(prediction, training_target(prediction, x0, eps, schedule, t), x_t, schedule, t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_v_target_matches_formula_and_diffusers(name: str) -> None:
    schedule = make_schedule(name)
    generator = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 5, 3, 3, generator=generator)
    t = torch.tensor([3, 4, 10, 100, 900])
    abar = schedule.alphas_cumprod[t].float().view(-1, 1, 1)
    expected = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(training_target("v", x0, eps, schedule, t), expected, rtol=0, atol=1e-6)
    reference = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name]).get_velocity(x0, eps, t)
    torch.testing.assert_close(training_target("v", x0, eps, schedule, t), reference, rtol=0, atol=1e-5)
    assert training_target("eps", x0, eps, schedule, t) is eps
    assert training_target("x0", x0, eps, schedule, t) is x0


def test_min_snr_weights_follow_the_formula_per_prediction() -> None:
    schedule = make_schedule("linear")
    t = torch.tensor([0, 100, 300, 600, 999])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[t.numpy()]
    snr = abar / (1 - abar)
    gamma = 5.0
    clipped = np.minimum(snr, gamma)
    expected = {"x0": clipped, "eps": clipped / snr, "v": clipped / (snr + 1)}
    for prediction, weights in expected.items():
        got = min_snr_weight(schedule, t, gamma, prediction)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), weights, rtol=1e-6)
    assert snr[0] > gamma > snr[-1]  # both branches of the min are exercised


def test_min_snr_weighted_losses_agree_across_parameterisations() -> None:
    """The same denoising error costs the same weighted loss whichever quantity the network predicts."""
    schedule = make_schedule("cosine")
    generator = torch.Generator().manual_seed(4)
    x0, eps, x0_hat = torch.randn(3, 8, 2, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.linspace(0, 999, 8).long()
    x_t = schedule.add_noise(x0, eps, t)
    signal, noise = schedule.signal_noise(t, x0)
    eps_hat = (x_t - signal * x0_hat) / noise  # the eps the same (wrong) x0 guess implies
    losses = []
    for prediction in ("eps", "v", "x0"):
        output = training_target(prediction, x0_hat, eps_hat, schedule, t)
        target = training_target(prediction, x0, eps, schedule, t)
        weight = min_snr_weight(schedule, t, 5.0, prediction).double()
        losses.append(((output - target) ** 2).flatten(1).mean(1) * weight)
    torch.testing.assert_close(losses[0], losses[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(losses[1], losses[2], rtol=1e-6, atol=0)


def test_diffusion_loss_is_weighted_mean_of_per_sample_mse() -> None:
    output = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])
    target = torch.tensor([[[0.0, 0.0]], [[3.0, 1.0]]])
    # per-sample MSE: (1 + 4) / 2 = 2.5 and (9 + 1) / 2 = 5
    assert diffusion_loss(output, target).item() == pytest.approx(3.75)
    assert diffusion_loss(output, target, torch.tensor([2.0, 0.5])).item() == pytest.approx((5 + 2.5) / 2)
    assert diffusion_loss(output.half(), target.half()).dtype == torch.float32


def test_prediction_typo_is_a_user_error() -> None:
    schedule = make_schedule("linear")
    with pytest.raises(UserError, match="prediction"):
        training_target("epsilon", torch.zeros(1, 2), torch.zeros(1, 2), schedule, torch.tensor([1]))  # type: ignore


def test_flow_interpolation_ends_and_velocity_is_its_time_derivative() -> None:
    generator = torch.Generator().manual_seed(5)
    noise, data = torch.randn(2, 4, 3, 2, 2, generator=generator)
    torch.testing.assert_close(flow_interpolate(noise, data, torch.zeros(4)), noise)
    torch.testing.assert_close(flow_interpolate(noise, data, torch.ones(4)), data)
    t = torch.rand(4, generator=generator).requires_grad_(True)
    (grad,) = torch.autograd.grad(flow_interpolate(noise, data, t).sum(dim=(1, 2, 3)).sum(), t)
    torch.testing.assert_close(grad, flow_velocity_target(noise, data).sum(dim=(1, 2, 3)))


def test_flow_time_distributions() -> None:
    uniform = sample_flow_time(50_000, torch.Generator().manual_seed(6))
    assert 0 <= uniform.min() and uniform.max() < 1
    assert uniform.mean().item() == pytest.approx(0.5, abs=5 * (1 / 12) ** 0.5 / 50_000**0.5)
    again = sample_flow_time(50_000, torch.Generator().manual_seed(6))
    assert torch.equal(uniform, again)
    logit_normal = sample_flow_time(50_000, torch.Generator().manual_seed(7), distribution="logit_normal", loc=0.5,
                                    scale=0.8)
    logits = torch.logit(logit_normal.double())
    assert logits.mean().item() == pytest.approx(0.5, abs=5 * 0.8 / 50_000**0.5)
    assert logits.std().item() == pytest.approx(0.8, abs=5 * 0.8 / (2 * 50_000) ** 0.5)
