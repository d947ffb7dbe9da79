"""EDM preconditioning, its noise levels and weighting, logit-normal flow time, and the choices' validation, checked
against closed forms (Karras et al. 2022, Table 1 and eq. 8; the log-normal's moments; an exactly solvable ODE)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from denoiser_support import TINY_UNET, fixed_batch, loader, one_thread, trainer
from torch import nn

from lightning_diffusion.diffusion.denoisers import SamplingDenoiser
from lightning_diffusion.diffusion.edm import (
    EDMPrecond, edm_coefficients, edm_loss_weight, log_normal_quantiles, sample_log_normal_sigma,
)
from lightning_diffusion.diffusion.module import Denoiser
from lightning_diffusion.diffusion.noise_grids import sigma_grid
from lightning_diffusion.diffusion.samplers import euler_sample, heun_sample
from lightning_diffusion.diffusion.schedules import NoiseSchedule
from lightning_diffusion.diffusion.training_objective import TrainingObjective
from lightning_diffusion.diffusion.unet import UNet
from lightning_diffusion.errors import UserError

SIGMA_DATA = 0.5


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


class Affine(nn.Module):
    """A fixed random stand-in for the U-Net ``F(x, c_noise)``: a per-pixel map that depends on the noise label."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 1, 1, generator=generator))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return self.weight * x + c_noise[:, None, None, None]


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 2.0, 80.0])
def test_coefficients_are_the_papers_table_1(sigma: float) -> None:
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor([sigma], dtype=torch.float64), SIGMA_DATA)
    assert c_skip.item() == pytest.approx(SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2), rel=1e-12)
    assert c_out.item() == pytest.approx(sigma * SIGMA_DATA / math.sqrt(sigma**2 + SIGMA_DATA**2), rel=1e-12)
    assert c_in.item() == pytest.approx(1 / math.sqrt(sigma**2 + SIGMA_DATA**2), rel=1e-12)
    assert c_noise.item() == pytest.approx(math.log(sigma) / 4, rel=1e-12)
    # eq. 8: the loss weight times c_out^2 is 1, so every sigma's effective loss has the same scale
    assert (edm_loss_weight(torch.tensor([sigma], dtype=torch.float64)).double() * c_out**2).item() == pytest.approx(1)


def test_network_input_and_effective_target_have_unit_variance() -> None:
    """The preconditioning's purpose (EDM appendix B.6): for data of std sigma_data, ``c_in x`` and the target of
    ``F``, ``(x0 - c_skip x) / c_out``, are unit-variance at every noise level."""
    generator = torch.Generator().manual_seed(0)
    x0 = SIGMA_DATA * torch.randn(200_000, generator=generator, dtype=torch.float64)
    noise = torch.randn(200_000, generator=generator, dtype=torch.float64)
    for sigma in (0.01, 0.5, 5.0, 80.0):
        c_skip, c_out, c_in, _ = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), SIGMA_DATA)
        x = x0 + sigma * noise
        assert (c_in * x).std().item() == pytest.approx(1, abs=0.01)
        assert ((x0 - c_skip * x) / c_out).std().item() == pytest.approx(1, abs=0.01)


def test_preconditioned_loss_equals_the_weighted_x0_loss() -> None:
    """``lambda(sigma) ||D(x, sigma) - x0||^2 = ||F(c_in x, c_noise) - (x0 - c_skip x) / c_out||^2`` (EDM eq. 8)."""
    objective = TrainingObjective("edm", NoiseSchedule.cosine(100), sigma_data=SIGMA_DATA)
    network = Affine()
    generator = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 4, 4, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.tensor([0.002, 0.05, 0.3, 1.0, 7.0, 80.0])
    loss = objective.loss(lambda x, s: objective.predict(network, x, s, {}), x0, noise, sigma)
    x = x0 + sigma[:, None, None, None] * noise
    total = sigma**2 + SIGMA_DATA**2
    c_skip, c_out, c_in = SIGMA_DATA**2 / total, sigma * SIGMA_DATA / total.sqrt(), 1 / total.sqrt()
    target = (x0 - c_skip[:, None, None, None] * x) / c_out[:, None, None, None]
    effective = (network(c_in[:, None, None, None] * x, sigma.log() / 4) - target).square().flatten(1).mean(1)
    torch.testing.assert_close(loss, effective.mean(), rtol=1e-4, atol=0)
    unweighted = objective.loss(lambda x, s: objective.predict(network, x, s, {}), x0, noise, sigma, weighted=False)
    denoised = EDMPrecond(network, SIGMA_DATA)(x, sigma)
    torch.testing.assert_close(unweighted, (denoised - x0).square().mean(), rtol=1e-5, atol=0)


def test_log_normal_sigma_has_the_papers_moments() -> None:
    generator = torch.Generator().manual_seed(0)
    sigma = sample_log_normal_sigma(400_000, generator, p_mean=-1.2, p_std=1.2).double()
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.01)
    assert sigma.mean().item() == pytest.approx(math.exp(-1.2 + 1.2**2 / 2), rel=0.02)  # E[sigma] of a log-normal
    quantiles = log_normal_quantiles(5, -1.2, 1.2)
    assert quantiles[2].item() == pytest.approx(math.exp(-1.2), rel=1e-6)  # the middle bin centre is the median
    assert (sigma < quantiles[0]).double().mean().item() == pytest.approx(0.1, abs=0.005)


def test_unet_time_embedding_takes_continuous_negative_noise_labels() -> None:
    torch.manual_seed(0)
    unet = UNet(in_channels=3, image_size=8, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                attention_resolutions=(), num_heads=1)
    for module in unet.modules():  # undo the zero initialisation, so the time embedding reaches the output
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.2)
    x = torch.randn(1, 3, 8, 8)
    labels = torch.tensor([math.log(0.002) / 4, -0.3, -0.29, math.log(80.0) / 4])
    out = unet(x.expand(4, -1, -1, -1), labels)
    assert torch.isfinite(out).all()
    for a, b in ((0, 1), (1, 2), (2, 3)):
        assert not torch.allclose(out[a], out[b]), (labels[a], labels[b])


def test_heun_solves_the_gaussian_data_ode() -> None:
    """For data N(0, s^2 I) the exact EDM denoiser is ``D = s^2 / (s^2 + sigma^2) x`` and the probability-flow ODE
    maps ``x(sigma_max)`` to ``x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2)``: through the sampling wrapper's
    ``edm`` type, Euler converges with order 1 and Heun with order 2 on the Karras grid from 80 to 0.002."""
    s = 0.5

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return s**2 / (s**2 + sigma[:, None] ** 2) * x

    denoiser = SamplingDenoiser(denoise, "edm")
    x_T = 80.0 * torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = x_T * s / math.sqrt(s**2 + 80.0**2)
    errors = {}
    for name, sample in (("euler", euler_sample), ("heun", heun_sample)):
        for steps in (32, 64):
            x = sample(denoiser, x_T, sigma_grid(denoiser, steps))
            errors[name, steps] = (x - exact).abs().max().item() / exact.abs().max().item()
    assert 1.8 < errors["euler", 32] / errors["euler", 64] < 2.2, errors
    assert 3.6 < errors["heun", 32] / errors["heun", 64] < 4.4, errors
    assert errors["heun", 64] < 5e-3, errors
    sigmas = sigma_grid(denoiser, 32)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-2].item() == pytest.approx(0.002)


def test_edm_denoiser_trains_and_samples_on_the_karras_grid(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Denoiser(**TINY_UNET, objective="edm", conditioning="class", num_classes=3, val_labels=(0, 1),
                     lr=2e-3, ema_decay=None, val_sampler="heun", val_guidance=2.0)
    assert (model.objective.noise_sampling, model.objective.loss_weighting) == ("log_normal", "edm")
    batch = fixed_batch()

    def fixed_loss() -> float:
        model.eval()
        with torch.no_grad():
            x0, condition = model.batch_x0(batch, sample=False), model.batch_condition(batch)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
            return sum(model.loss_at(x0, noise, torch.full((8,), float(s)), condition).item()
                       for s in model.objective.fixed_times(4))

    before = fixed_loss()
    model.train()
    trainer(tmp_path, max_steps=30).fit(model, loader(batch, 30))
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)
    images = model.eval().generate(labels=[0, 1], steps=3, seed=5)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    torch.testing.assert_close(images, model.generate(labels=[0, 1], steps=3, seed=5))
    euler = model.generate(labels=[0, 1], steps=3, seed=5, sampler="euler")
    assert not torch.allclose(images, euler)


def test_logit_normal_flow_time_is_reachable_from_the_arguments() -> None:
    model = Denoiser(**TINY_UNET, conditioning="none", objective="flow", val_sampler="euler",
                     noise_sampling="logit_normal", noise_mean=0.5, noise_std=0.8)
    torch.manual_seed(0)
    t = model.objective.sample_times(100_000, "cpu").double()
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)
    uniform = Denoiser(**TINY_UNET, conditioning="none", objective="flow", val_sampler="euler")
    assert uniform.objective.sample_times(100_000, "cpu").double().mean().item() == pytest.approx(0.5, abs=0.005)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(objective="edm", noise_sampling="uniform", val_sampler="heun"), "model.noise_sampling 'uniform' does not fit"),
    (dict(objective="eps", noise_sampling="log_normal"), "model.noise_sampling 'log_normal'"),
    (dict(objective="eps", noise_sampling="logit_normal"), "use uniform"),
    (dict(objective="v", loss_weighting="edm"), "model.loss_weighting 'edm' does not fit model.objective 'v'"),
    (dict(objective="flow", val_sampler="euler", loss_weighting="min_snr"), "model.loss_weighting 'min_snr'"),
    (dict(objective="eps", loss_weighting="min_snr"), "needs model.min_snr_gamma"),
    (dict(objective="edm", val_sampler="heun", min_snr_gamma=5.0), "model.min_snr_gamma is set"),
    (dict(objective="eps", noise_mean=0.3), "model.noise_mean/noise_std"),
    (dict(objective="edm", val_sampler="heun", noise_std=0.0), "model.noise_std must be positive"),
    (dict(objective="edm", val_sampler="heun", sigma_data=-1.0), "model.sigma_data"),
    (dict(objective="edm"), "model.val_sampler 'ddim' needs a DDPM-style model but this one uses the edm"),
])
def test_bad_objective_choices_are_one_line_user_errors(overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as error:
        Denoiser(**{**TINY_UNET, "conditioning": "none", **overrides})
    assert "\n" not in str(error.value)


def test_min_snr_gamma_alone_still_means_min_snr_weighting() -> None:
    """Configs written before `loss_weighting` existed (min_snr_gamma: 5) keep their meaning."""
    model = Denoiser(**TINY_UNET, conditioning="none", min_snr_gamma=5.0)
    assert model.objective.loss_weighting == "min_snr"
