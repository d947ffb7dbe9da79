"""Self-attention over feature-map positions and cross-attention to text tokens, both via ``scaled_dot_product_attention``,
optionally followed by a GEGLU feed-forward (the third sublayer of Stable Diffusion's transformer block).

The output projection of each branch starts at zero, so a new attention block is the identity (Zhang et al.'s
Fixup idea, used by ADM and Stable Diffusion).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of ``module``: the residual branch it ends starts as a no-op."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (the DDPM/ADM choice), fewer when ``channels`` is small."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, N, C] -> [B, heads, N, C / heads]``."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the ``H * W`` positions of a feature map (pre-GroupNorm, residual)."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels {channels} must be divisible by heads {heads}")
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (_split_heads(part, self.heads) for part in self.qkv(tokens).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.proj_out(out).transpose(1, 2).reshape(b, c, h, w)


class CrossAttention(nn.Module):
    """Queries from the feature map, keys and values from a token sequence ``context [B, L, D]`` (residual).

    ``context_mask [B, L]`` (True = real token) keeps padding out of the softmax; every row needs one True.
    """

    def __init__(self, channels: int, context_dim: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels {channels} must be divisible by heads {heads}")
        self.heads = heads
        self.norm = group_norm(channels)
        self.context_norm = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(context_dim, 2 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        q = _split_heads(self.to_q(self.norm(x).flatten(2).transpose(1, 2)), self.heads)
        k, v = (_split_heads(part, self.heads) for part in self.to_kv(self.context_norm(context)).chunk(2, dim=-1))
        attn_mask = None if context_mask is None else context_mask.bool()[:, None, None, :]  # [B, 1, 1, L]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(b, h * w, c)
        return x + self.proj_out(out).transpose(1, 2).reshape(b, c, h, w)


class FeedForward(nn.Module):
    """Per-position GEGLU MLP (Shazeer 2020; LDM's ``SpatialTransformer``): LayerNorm, ``C -> 2 * mult * C``, the
    GELU of one half gating the other, ``mult * C -> C`` (zero-initialised), residual. Adds ``3 mult C^2 +
    (2 mult + 3) C`` parameters."""

    def __init__(self, channels: int, mult: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.proj_in = nn.Linear(channels, 2 * mult * channels)
        self.proj_out = zero_module(nn.Linear(mult * channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        value, gate = self.proj_in(self.norm(x.flatten(2).transpose(1, 2))).chunk(2, dim=-1)
        return x + self.proj_out(value * F.gelu(gate)).transpose(1, 2).reshape(b, c, h, w)


class AttentionBlock(nn.Module):
    """Self-attention, then (for text-conditioned models) cross-attention to the text tokens, then (optionally) a
    feed-forward."""

    def __init__(self, channels: int, heads: int, context_dim: int | None, feed_forward: bool = False) -> None:
        super().__init__()
        self.self_attention = SelfAttention(channels, heads)
        self.cross_attention = CrossAttention(channels, context_dim, heads) if context_dim else None
        self.feed_forward = FeedForward(channels) if feed_forward else None  # None: no state-dict keys

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        # The sublayers work on [B, HW, C] tokens, which in channels_last memory are free views of the feature map:
        # one layout change here instead of a transposing copy into and out of every sublayer.
        restore = not x.is_contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.self_attention(x)
        if self.cross_attention is not None:
            if context is None:
                raise ValueError("this U-Net cross-attends to text: pass `context` (and `context_mask`)")
            x = self.cross_attention(x, context, context_mask)
        if self.feed_forward is not None:
            x = self.feed_forward(x)
        return x.contiguous() if restore else x
