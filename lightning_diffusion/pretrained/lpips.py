"""LPIPS through torchmetrics, without surprise downloads.

torchmetrics ships LPIPS' learned linear heads, but the backbone (AlexNet, VGG16 or SqueezeNet 1.1 from
torchvision) is downloaded on first use. torchvision first looks in `$TORCH_HOME/hub/checkpoints/<file>`;
we check that file before constructing anything, so an offline node fails at once with the file's name and
the way to get it, instead of retrying the network.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

from lightning_diffusion.errors import UserError

LPIPSNet = Literal["alex", "vgg", "squeeze"]

# torchvision's file names (the hash prefix is part of the name; torchvision checks it only when downloading).
BACKBONE_FILES: dict[str, tuple[str, str]] = {
    "alex": ("alexnet-owt-7be5be79.pth", "alexnet"),
    "vgg": ("vgg16-397923af.pth", "vgg16"),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth", "squeezenet1_1"),
}


def resolve_torch_home(path: str | os.PathLike | None = None) -> Path:
    """The torch cache folder: `path`, else `$TORCH_HOME`, else `~/.cache/torch` (torch.hub's rule)."""
    if path is not None:
        return Path(path).expanduser()
    return Path(os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "torch")).expanduser()


def backbone_weights_path(net_type: str, home: str | os.PathLike | None = None) -> Path:
    """Where torchvision expects the LPIPS backbone's weights."""
    if net_type not in BACKBONE_FILES:
        raise UserError(f"LPIPS net_type '{net_type}' is unknown: use one of {', '.join(BACKBONE_FILES)}")
    return resolve_torch_home(home) / "hub" / "checkpoints" / BACKBONE_FILES[net_type][0]


def check_backbone_weights(net_type: str, home: str | os.PathLike | None = None) -> Path:
    """Raise a `UserError` naming the file and how to get it when the backbone weights are not cached (or are not
    a plain-weights file)."""
    path = backbone_weights_path(net_type, home)
    if path.is_file():  # torchvision loads it with weights_only=False: refuse a pickle that would run code first
        from lightning_diffusion.training.checkpoints import check_checkpoint

        check_checkpoint(path, what=f"LPIPS ({net_type}) backbone weights")
    else:
        file_name, builder = BACKBONE_FILES[net_type]
        raise UserError(
            f"LPIPS ({net_type}) needs the torchvision backbone weights '{path}', which are missing: on a machine "
            f"with internet run `python -c \"import torchvision; torchvision.models.{builder}(weights='DEFAULT')\"` "
            f"and copy ~/.cache/torch/hub/checkpoints/{file_name} there (or set torch_home / TORCH_HOME to the folder "
            f"that holds hub/checkpoints/{file_name}); or use the offline perceptual distance 'effnet'"
        )
    return path


@contextmanager
def _hub_dir(home: Path) -> Iterator[None]:
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(home / "hub"))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


def make_lpips(net_type: LPIPSNet = "alex", torch_home: str | os.PathLike | None = None,
               reduction: Literal["mean", "sum"] = "mean"):  # noqa: ANN201 - a torchmetrics Metric
    """torchmetrics' LPIPS metric (inputs in [-1, 1]) with its backbone loaded from the local torch cache."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    check_backbone_weights(net_type, torch_home)
    with _hub_dir(resolve_torch_home(torch_home)):
        return LearnedPerceptualImagePatchSimilarity(net_type=net_type, reduction=reduction, normalize=False)


class LPIPSDistance(nn.Module):
    """Per-sample LPIPS distance for training losses (frozen, eval mode, gradients flow to the images)."""

    def __init__(self, net_type: LPIPSNet = "alex", torch_home: str | None = None) -> None:
        super().__init__()
        self.net = make_lpips(net_type, torch_home).net.eval().requires_grad_(False)
        self.name = f"lpips_{net_type}"

    def train(self, mode: bool = True) -> "LPIPSDistance":
        """Always eval (dropout in LPIPS' heads off)."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distances [B] between images in [-1, 1]."""
        return self.net(x.float(), y.float(), normalize=False).reshape(x.shape[0])
