"""VAE-GAN loss terms: reconstruction, GAN losses (hinge / non-saturating) and the adaptive GAN weight.

The KL term lives with the posterior (`DiagonalGaussian.kl`). Weighting follows Esser et al. (2021) and
Rombach et al. (2022), with every term a per-pixel mean (their summed terms divided by C*H*W), so `beta`
and `disc_weight` mean the same as their `kl_weight` and `disc_weight`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GANLoss = Literal["hinge", "non_saturating"]


def reconstruction_loss(x: Tensor, x_hat: Tensor, kind: Literal["l1", "l2"]) -> Tensor:
    """Per-sample mean absolute (l1) or squared (l2) error, `[B]`."""
    diff = (x_hat.float() - x.float())
    return (diff.abs() if kind == "l1" else diff.pow(2)).flatten(1).mean(dim=1)


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: GANLoss, real_label: float = 1.0) -> Tensor:
    """The discriminator's loss (half the sum over real and fake).

    hinge: mean(relu(1 - D(x))) + mean(relu(1 + D(G))); non-saturating: binary cross-entropy with targets
    `real_label` (0.9 = one-sided label smoothing) for real and 0 for fake, i.e. maximise log D(x) + log(1 - D(G)).
    """
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        if real_label != 1.0:
            raise ValueError("label smoothing applies to the non-saturating loss only")
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    real = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, real_label))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return 0.5 * (real + fake)


def generator_loss(fake_logits: Tensor, kind: GANLoss) -> Tensor:
    """The decoder's adversarial loss: -mean D(G) (hinge) or -mean log sigmoid D(G) (non-saturating)."""
    fake_logits = fake_logits.float()
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: nn.Parameter, max_weight: float = 1e4) -> Tensor:
    """||grad_last rec_loss|| / (||grad_last gan_loss|| + 1e-4), clamped to [0, max_weight] and detached.

    Balances the two gradients at the decoder's last layer (Esser et al. 2021, eq. 7).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
