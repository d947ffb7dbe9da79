"""Perceptual distances against independent references, offline.

LPIPS: the real torchvision backbone weights are a download, so the test saves a seeded random AlexNet where
torchvision looks for it (a temporary $TORCH_HOME) and checks every project entry to LPIPS (the evaluate metric, the
VAE-GAN loss, `LPIPSDistance`) against LPIPS computed by hand (Zhang et al. 2018, eq. 1: scaling layer, unit-
normalised ReLU features, squared differences weighted by torchmetrics' shipped linear heads, spatial mean, sum)
and against torchmetrics' own `LearnedPerceptualImagePatchSimilarity` on the same weights.
EfficientNet-Lite0: the distance on hand-built feature maps with a closed-form value, and its feature taps against
timm's `features_only` model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from lightning_diffusion.autoencoder.perceptual import make_perceptual
from lightning_diffusion.metrics.perceptual import PerceptualDistance
from lightning_diffusion.pretrained.efficientnet import (
    ARCHITECTURE,
    PERCEPTUAL_BLOCKS,
    EfficientNetLite0Features,
)
from lightning_diffusion.pretrained.lpips import BACKBONE_FILES, LPIPSDistance, make_lpips

ALEX_RELUS = (1, 4, 7, 9, 11)  # the ReLU outputs of torchvision's alexnet.features that LPIPS reads
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A $TORCH_HOME whose AlexNet backbone file holds seeded random weights."""
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(1234)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(),
               home / "hub" / "checkpoints" / BACKBONE_FILES["alex"][0])
    return home


def linear_heads() -> dict[str, torch.Tensor]:
    import torchmetrics.functional.image.lpips as tm_lpips

    path = Path(tm_lpips.__file__).parent / "lpips_models" / "alex.pth"
    return torch.load(path, map_location="cpu", weights_only=True)


def lpips_by_hand(home: Path, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample LPIPS (AlexNet) computed from the formula, on the backbone file in `home`."""
    net = torchvision.models.alexnet(weights=None)
    net.load_state_dict(torch.load(home / "hub" / "checkpoints" / BACKBONE_FILES["alex"][0], weights_only=True))
    heads = linear_heads()

    def features(images: torch.Tensor) -> list[torch.Tensor]:
        h, taps = (images - SHIFT) / SCALE, []
        for index, layer in enumerate(net.features[: max(ALEX_RELUS) + 1]):
            h = layer(h)
            if index in ALEX_RELUS:
                taps.append(h.clone())
        return taps

    total = torch.zeros(x.shape[0])
    for level, (fx, fy) in enumerate(zip(features(x), features(y))):
        fx = fx / torch.sqrt(fx.pow(2).sum(1, keepdim=True) + 1e-8)
        fy = fy / torch.sqrt(fy.pow(2).sum(1, keepdim=True) + 1e-8)
        weight = heads[f"lin{level}.model.1.weight"].view(1, -1, 1, 1)
        total += ((fx - fy).pow(2) * weight).sum(1).mean(dim=(1, 2))
    return total


def image_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 8, generator=g), size=48, mode="bilinear") * 2 - 1
    y = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, y


@torch.no_grad()
def test_lpips_entries_match_the_formula_and_torchmetrics(torch_home: Path) -> None:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    x, y = image_pairs()
    reference = lpips_by_hand(torch_home, x, y)
    assert (reference > 1e-4).all()

    metric = make_lpips("alex", torch_home)  # evaluate's lpips
    metric.update(x, y)
    torch.testing.assert_close(metric.compute(), reference.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(LPIPSDistance("alex", str(torch_home))(x, y), reference, rtol=1e-5, atol=1e-7)
    loss = make_perceptual("lpips_alex", torch_home=str(torch_home))  # the VAE-GAN's perceptual term
    torch.testing.assert_close(loss(x, y), reference, rtol=1e-5, atol=1e-7)

    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(torch_home / "hub"))  # where torchvision looks for the backbone file
    try:
        oracle = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="mean")
    finally:
        torch.hub.set_dir(previous)
    oracle.update(x, y)
    torch.testing.assert_close(metric.compute(), oracle.compute(), rtol=1e-6, atol=1e-8)


class HandMadeFeatures(EfficientNetLite0Features):
    """`perceptual_distance` on feature maps given by the test instead of the network."""

    def __init__(self, maps: dict[int, list[torch.Tensor]]) -> None:
        torch.nn.Module.__init__(self)
        self.maps = maps

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.maps[int(images.flatten()[0])]


def test_effnet_distance_on_hand_built_features() -> None:
    """Level 1: unit vectors e1 vs e2 at every position (squared distance 2), on half the positions of sample 1;
    level 2: parallel vectors of different length (distance 0 after normalisation). Per sample: 2 and 1."""
    e1 = torch.zeros(2, 3, 2, 2)
    e1[:, 0] = 1.0
    e2 = torch.zeros(2, 3, 2, 2)
    e2[:, 1] = 1.0
    e2[1, :, 0] = e1[1, :, 0]  # sample 1: the top row agrees
    parallel = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1).expand(2, 2, 4, 4)
    net = HandMadeFeatures({0: [e1, parallel], 1: [e2, 5 * parallel]})
    x, y = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    torch.testing.assert_close(net.perceptual_distance(x, y), torch.tensor([2.0, 1.0]))
    metric = PerceptualDistance(net, "hand")
    metric.update(x, y)
    assert metric.compute().item() == pytest.approx(1.5)


@torch.no_grad()
def test_effnet_feature_taps_are_timms_stride_4_to_32_features() -> None:
    import timm

    effnet = EfficientNetLite0Features(input_size=64)
    reference = timm.create_model(ARCHITECTURE, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
    assert [f"blocks.{i}" for i in PERCEPTUAL_BLOCKS] == reference.feature_info.module_name()
    own = effnet.net.state_dict()
    reference.load_state_dict({key: own[key] for key in reference.state_dict()}, strict=True)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    for ours, theirs in zip(effnet.feature_maps(x), reference.eval()(x), strict=True):
        torch.testing.assert_close(ours, theirs)
