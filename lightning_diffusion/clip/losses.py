"""The contrastive objectives, taken from open_clip: InfoNCE (`ClipLoss`) or sigmoid (`SigLipLoss`).

Across ranks, `ClipLoss(local_loss=True, gather_with_grad=True)` scores the local rows against every rank's
features; with equal per-rank batches the rank losses average to the loss of the concatenated global batch,
and because the gather passes gradients back, DDP's gradient average equals the gradient of that global loss.
`SigLipLoss` exchanges text features between neighbouring ranks with gradients; its per-rank loss is
`-sum_ij log sigmoid(z_ij (t s_ij + b)) / n_local`, which also averages over ranks to the global loss.
"""

from __future__ import annotations

from typing import Literal

from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from lightning_diffusion.errors import UserError


def make_contrastive_loss(kind: Literal["clip", "siglip"], *, rank: int = 0, world_size: int = 1) -> nn.Module:
    """open_clip's loss for `kind`, set up to gather features from all `world_size` ranks.

    Call it as `loss(image_features, text_features, logit_scale.exp(), logit_bias)` on L2-normalised features.
    """
    if kind == "clip":
        return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    raise UserError(f"loss '{kind}' is not one of 'clip', 'siglip'")
