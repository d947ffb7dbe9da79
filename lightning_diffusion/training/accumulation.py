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


class ManualAccumulation:
    """The accumulation window of a manually optimised module (the VAE-GAN): each batch's loss is divided by
    ``count``, the optimisers step every ``count`` batches and at an epoch's last batch (as Lightning's automatic
    accumulation does), and a window with a skipped (non-finite) batch steps with no gradients at all."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.skipped = False

    def starts(self, batch_idx: int) -> bool:
        return batch_idx % self.count == 0

    def backward(self, module: Any, loss: Any, skip: bool) -> bool:
        """Accumulate this batch's gradients unless it is skipped; True when it was."""
        self.skipped |= skip
        if not skip:
            module.manual_backward(loss / self.count)
        return not skip

    def ends(self, module: Any, batch_idx: int) -> bool:
        return (batch_idx + 1) % self.count == 0 or module.trainer.is_last_batch

    def step(self, module: Any, counted: Any, others: list[Any], step_others: bool) -> None:
        """Step ``counted`` (a LightningOptimizer: it counts ``global_step``) and, with ``step_others``, the others
        through the strategy (precision plugin and clipping hook, not counted), then clear every gradient. A skipped
        window steps with no gradients: Adam leaves every weight as it is, and ``global_step`` still counts it."""
        optimizers = [counted, *others]
        if self.skipped:
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
        counted.step()
        if step_others and not self.skipped:
            for optimizer in others:
                module.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=module)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.skipped = False
