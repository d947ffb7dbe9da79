"""What the denoiser is conditioned on, as the U-Net's keyword arguments, and the null condition for guidance.

A condition is a dict of tensors named like :meth:`UNet.forward`'s arguments (``context``, ``context_mask``,
``pooled``, ``label``, ``lowres``), batched in dim 0, so classifier-free guidance can concatenate a condition with
its null counterpart and run one forward pass. The null condition (what classifier-free training drops to) is:

- text: a learned null token in position 0 (the only unmasked position) and a learned pooled vector;
- class: the extra class index ``num_classes`` of the U-Net's label embedding;
- low-res image: never dropped; it is the input of a super-resolution stage, not a prompt, and is kept as is.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Conditioning = Literal["none", "text", "class", "lowres", "text+lowres", "class+lowres"]
Condition = dict[str, Tensor]


def condition_kinds(conditioning: str) -> frozenset[str]:
    """``"text+lowres" -> {"text", "lowres"}``; ``"none" -> {}``."""
    return frozenset() if conditioning == "none" else frozenset(conditioning.split("+"))


def is_guidable(conditioning: str) -> bool:
    """Whether a model has a condition classifier-free guidance can contrast with its null (text or class)."""
    return bool(condition_kinds(conditioning) & {"text", "class"})


def downsample_for_lowres(image: Tensor, size: int) -> Tensor:
    """The low-resolution input of a super-resolution stage: an antialiased bilinear resize of the image."""
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)


class NullCondition(nn.Module):
    """The learned parts of the null condition, and the dropping of conditions to it.

    Trainable (its parameters are part of the denoiser and of its EMA); ``text_width``/``pooled_dim`` are the
    frozen text encoder's token-state width and pooled size, ``num_classes`` the number of real classes.
    """

    def __init__(self, conditioning: str, text_width: int | None = None, pooled_dim: int | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__()
        if conditioning not in get_args(Conditioning):
            raise ValueError(f"unknown conditioning {conditioning!r}")
        self.kinds = condition_kinds(conditioning)
        self.num_classes = num_classes
        if "text" in self.kinds:
            self.null_token = nn.Parameter(torch.randn(text_width) * 0.02)
            self.null_pooled = nn.Parameter(torch.randn(pooled_dim) * 0.02)

    def null_like(self, condition: Condition) -> Condition:
        """The null condition, shaped like ``condition`` (same batch size and token length)."""
        null = dict(condition)
        if "context" in condition:
            context = torch.zeros_like(condition["context"])
            context[:, 0] = self.null_token.to(context.dtype)
            null["context"] = context
            mask = torch.zeros_like(condition["context_mask"])
            mask[:, 0] = True
            null["context_mask"] = mask
            null["pooled"] = self.null_pooled.to(condition["pooled"].dtype).expand_as(condition["pooled"])
        if "label" in condition:
            null["label"] = torch.full_like(condition["label"], self.num_classes)
        return null

    def drop(self, condition: Condition, drop: Tensor) -> Condition:
        """Replace the condition of sample ``i`` by the null condition where ``drop[i]`` (bool [B]) is True."""
        null = self.null_like(condition)
        dropped = {}
        for key, value in condition.items():
            where = drop.to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
            dropped[key] = torch.where(where, null[key], value)
        return dropped


def uncond_drop_mask(batch_size: int, p_uncond: float, seed: int, step: int, batch_idx: int, rank: int) -> Tensor:
    """Bernoulli(``p_uncond``) drops of the condition, seeded by (seed, step, batch_idx, rank): a rerun or resumed
    run drops the same samples, every rank follows the same rule, and ranks (holding different data) draw apart."""
    key = [seed, step, batch_idx, rank]
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
    return torch.rand(batch_size, generator=generator) < p_uncond
