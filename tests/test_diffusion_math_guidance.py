"""Classifier-free guidance, classifier guidance and dynamic thresholding."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from lightning_diffusion.diffusion.guidance import classifier_free_guidance, classifier_guidance, dynamic_threshold
from lightning_diffusion.diffusion.objectives import output_from_x0_eps, to_x0_eps
from lightning_diffusion.diffusion.denoisers import SamplingDenoiser
from lightning_diffusion.diffusion.noise_grids import discrete_timesteps
from lightning_diffusion.diffusion.samplers import ddim_sample
from lightning_diffusion.diffusion.schedules import make_schedule
from lightning_diffusion.errors import UserError


class CountingModel:
    """A conditional 'network' with a dict condition: output depends on x, t, tokens, mask and label."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls.append(x.shape[0])
        text = (cond["tokens"].float() * cond["mask"]).sum(1) / 10
        shift = (text + cond["label"].float() + t.float() / 1000).view(-1, 1, 1, 1)
        return torch.tanh(x) * (1 + shift) + shift


def conditions(batch: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    cond = {"tokens": torch.randint(1, 50, (batch, 5), generator=generator),
            "mask": torch.ones(batch, 5), "label": torch.arange(batch)}
    null = {"tokens": torch.zeros(1, 5, dtype=torch.long), "mask": torch.zeros(1, 5),
            "label": torch.full((1,), 7)}  # one learned null, broadcast over the batch
    return cond, null


def test_cfg_scale_one_is_conditional_zero_unconditional_and_general_scale_is_one_forward() -> None:
    batch = 3
    x = torch.randn(batch, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 999])
    cond, null = conditions(batch)
    model = CountingModel()
    conditional = model(x, t, cond)
    unconditional = model(x, t, {key: value.expand(batch, *value.shape[1:]) for key, value in null.items()})
    model.calls.clear()

    torch.testing.assert_close(classifier_free_guidance(model, cond, null, 1.0)(x, t), conditional)
    torch.testing.assert_close(classifier_free_guidance(model, cond, null, 0.0)(x, t), unconditional)
    assert model.calls == [batch, batch]  # the shortcuts run one half-size forward each

    model.calls.clear()
    for scale in (0.5, 3.0, 7.5):
        guided = classifier_free_guidance(model, cond, null, scale)(x, t)
        torch.testing.assert_close(guided, unconditional + scale * (conditional - unconditional))
    assert model.calls == [2 * batch] * 3  # one batched forward per call


def test_cfg_concatenates_tensor_conditions() -> None:
    x = torch.randn(2, 3)
    t = torch.tensor([1, 2])
    seen = []

    def model(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        seen.append((x.clone(), t.clone(), c.clone()))
        return x * c[:, None]

    labels, null = torch.tensor([4.0, 5.0]), torch.tensor([0.5, 0.5])
    out = classifier_free_guidance(model, labels, null, 2.0)(x, t)
    (x2, t2, c2), = seen
    assert torch.equal(x2, torch.cat([x, x])) and torch.equal(t2, torch.cat([t, t]))
    assert torch.equal(c2, torch.tensor([4.0, 5.0, 0.5, 0.5]))
    torch.testing.assert_close(out, x * 0.5 + 2 * (x * labels[:, None] - x * 0.5))


def test_cfg_inside_a_sampler_changes_samples_and_w1_matches_the_conditional_sampler() -> None:
    schedule = make_schedule("linear")
    cond, null = conditions(2)
    model = CountingModel()
    start = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    steps = discrete_timesteps(1000, 10)

    def sample(network) -> torch.Tensor:
        return ddim_sample(SamplingDenoiser(network, "eps", schedule), start, steps)

    plain = sample(lambda x, t: model(x, t, cond))
    w1 = sample(classifier_free_guidance(model, cond, null, 1.0))
    w3 = sample(classifier_free_guidance(model, cond, null, 3.0))
    torch.testing.assert_close(w1, plain)
    assert (w3 - plain).abs().max() > 0.1


# classifier guidance ------------------------------------------------------------------------------------------

CENTRES = torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=torch.float64)  # class means of x_0
S = 0.4


def mixture_log_densities(x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """log N(x; sqrt(abar) c_y, (abar S^2 + 1 - abar) I) for each class y, [B, 2]: the noisy class marginals."""
    var = (abar * S**2 + 1 - abar).view(-1, 1)
    diff = x[:, None, :] - abar.sqrt().view(-1, 1, 1) * CENTRES.to(x)
    return -0.5 * (diff**2).sum(-1) / var - x.shape[1] / 2 * torch.log(2 * math.pi * var)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_classifier_guidance_with_the_bayes_classifier_gives_the_class_conditional_denoiser(prediction: str) -> None:
    """eps(x_t | y) = eps(x_t) - sqrt(1 - abar) grad log p(y | x_t): with the exact unconditional denoiser of a
    two-class Gaussian mixture and its exact noisy classifier, scale 1 must give the exact class-y denoiser."""
    schedule = make_schedule("cosine")
    y = torch.tensor([0, 1, 1, 0])

    def unconditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = schedule.alpha_bar(t).to(x)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            (score,) = torch.autograd.grad(torch.logsumexp(mixture_log_densities(x_in, abar), 1).sum(), x_in)
        eps = -(1 - abar).sqrt().view(-1, 1) * score
        x0 = (x - (1 - abar).sqrt().view(-1, 1) * eps) / abar.sqrt().view(-1, 1)
        return output_from_x0_eps(prediction, x0, eps, abar.sqrt().view(-1, 1), (1 - abar).sqrt().view(-1, 1))

    def log_prob(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_joint = mixture_log_densities(x, schedule.alpha_bar(t).to(x))
        return (log_joint - torch.logsumexp(log_joint, 1, keepdim=True)).gather(1, y[:, None]).squeeze(1)

    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([50, 300, 600, 900])
    with torch.no_grad():  # as inside a sampler
        guided = classifier_guidance(unconditional, log_prob, schedule, 1.0, prediction)(x, t)
    abar = schedule.alpha_bar(t).view(-1, 1)
    expected_eps = (x - abar.sqrt() * CENTRES[y]) * (1 - abar).sqrt() / (abar * S**2 + 1 - abar)
    _, eps = to_x0_eps(prediction, guided, x, schedule, t)
    torch.testing.assert_close(eps, expected_eps, rtol=0, atol=1e-10)

    doubled = classifier_guidance(unconditional, log_prob, schedule, 2.0, prediction)(x, t)
    _, eps_unguided = to_x0_eps(prediction, unconditional(x, t), x, schedule, t)
    torch.testing.assert_close(to_x0_eps(prediction, doubled, x, schedule, t)[1] - eps_unguided,
                               2 * (expected_eps - eps_unguided), rtol=0, atol=1e-10)


# dynamic thresholding -----------------------------------------------------------------------------------------


def test_dynamic_threshold_by_hand() -> None:
    x0 = torch.tensor([[0.5, -3.0, 2.0, 1.0],   # |x| sorted 0.5 1 2 3: median (p = 0.5) = 1.5 -> s = 1.5
                       [0.2, -0.4, 0.9, 0.1]])  # median 0.3 < 1 -> s = 1: unchanged
    expected = torch.tensor([[0.5 / 1.5, -1.0, 1.0, 1.0 / 1.5], [0.2, -0.4, 0.9, 0.1]])
    torch.testing.assert_close(dynamic_threshold(x0, 0.5), expected)
    # p = 0.9 on the first row: linear interpolation at 0.9 * 3 = 2.7 between 2 and 3 -> s = 2.7
    torch.testing.assert_close(dynamic_threshold(x0, 0.9)[0], torch.tensor([0.5, -2.7, 2.0, 1.0]) / 2.7)


def test_dynamic_threshold_matches_diffusers() -> None:
    x0 = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * torch.tensor([0.3, 1, 2, 4, 8]).view(
        -1, 1, 1, 1)
    reference = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1e9)
    torch.testing.assert_close(dynamic_threshold(x0), reference._threshold_sample(x0))
    assert dynamic_threshold(x0).abs().max() <= 1
    with pytest.raises(UserError, match="percentile"):
        dynamic_threshold(x0, 99.5)


def test_classifier_guided_edm_denoiser_gives_the_class_conditional_denoiser() -> None:
    """The same identity for a network that returns x0_hat given sigma (``x = x0 + sigma eps``): the unconditional
    mixture denoiser guided at scale 1 by the exact noisy classifier is the class-y denoiser c_y + S^2 (x - c_y) /
    (S^2 + sigma^2)."""
    from lightning_diffusion.diffusion.guidance import classifier_guided

    y = torch.tensor([0, 1, 1, 0])

    def log_densities(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        var = (S**2 + sigma**2).view(-1, 1)
        squared = ((x[:, None, :] - CENTRES.to(x)) ** 2).sum(-1)
        return -0.5 * squared / var - x.shape[1] / 2 * torch.log(2 * math.pi * var)

    def unconditional(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(log_densities(x, sigma), 1)  # p(y | x)
        var = (S**2 + sigma**2).view(-1, 1, 1)
        per_class = CENTRES.to(x) + S**2 / var * (x[:, None, :] - CENTRES.to(x))
        return (weights[..., None] * per_class).sum(1)

    def log_prob(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        log_joint = log_densities(x, sigma)
        return (log_joint - torch.logsumexp(log_joint, 1, keepdim=True)).gather(1, y[:, None]).squeeze(1)

    guided = classifier_guided(SamplingDenoiser(unconditional, "edm"), log_prob, 1.0)
    x = 3 * torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for sigma in (0.05, 0.5, 2.0, 20.0):
        with torch.no_grad():
            x0 = guided(x, sigma)
        expected = CENTRES[y] + S**2 / (S**2 + sigma**2) * (x - CENTRES[y])
        torch.testing.assert_close(x0, expected, rtol=0, atol=1e-10)
