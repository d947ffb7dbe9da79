"""The interface every frozen text encoder of the denoiser offers (see `lightning_diffusion.text_encoders`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn


class TextEncoder(nn.Module, ABC):
    """Captions -> per-token states, a padding mask and a pooled vector.

    Subclasses set `tokenizer` (a picklable `list[str] -> LongTensor[B, L]`, the DataModule's tokenizer hook),
    `context_length` (L), `width` (D of the states) and `pooled_dim` (P), and implement `forward` and
    `token_mask`.
    """

    tokenizer: Callable[[list[str]], torch.Tensor]
    context_length: int
    width: int
    pooled_dim: int

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids [B, context_length], padded and truncated as the encoder expects."""
        return self.tokenizer(list(captions))

    @abstractmethod
    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, L] -> (states [B, L, width], pooled [B, pooled_dim])."""

    @abstractmethod
    def token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """bool [B, L]: True at the real (non-padding) tokens the denoiser's cross-attention may read."""


def up_to_first(tokens: torch.Tensor, token_id: int) -> torch.Tensor:
    """True up to and including the first `token_id` of each row (everywhere when a row has none)."""
    hits = tokens == token_id
    first = torch.where(hits.any(1), hits.int().argmax(1), torch.full_like(tokens[:, 0], tokens.shape[1]))
    return torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= first[:, None]
