"""Gradient accumulation settings, checked before anything runs.

The denoiser and CLIP use Lightning's ``trainer.accumulate_grad_batches`` (automatic optimisation: the loss is
divided by N, the optimiser steps every N batches and ``global_step`` counts steps). The VAE-GAN optimises
manually, which Lightning's setting does not cover, so it takes ``model.accumulate_grad_batches`` instead.
Accumulating CLIP batches is not the same as a larger batch: each batch's contrastive loss only sees that batch's
negatives (N batches of B pairs: B - 1 negatives per pair, not N*B - 1).
"""

from __future__ import annotations

from typing import Any

from lightning_diffusion.errors import UserError


def check_accumulation(trainer: Any, model: Any) -> None:
    """One-line errors for ``trainer.accumulate_grad_batches`` below 1 and for setting it on a manual model."""
    count = trainer.accumulate_grad_batches
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"trainer.accumulate_grad_batches must be a positive integer, got {count!r}; set e.g. "
                        "trainer.accumulate_grad_batches: 2 (1 steps every batch)")
    if count != 1 and model is not None and not getattr(model, "automatic_optimization", True):
        raise UserError(f"trainer.accumulate_grad_batches does not apply to {type(model).__name__} (manual "
                        f"optimisation): set model.init_args.accumulate_grad_batches: {count} and remove "
                        "trainer.accumulate_grad_batches")
