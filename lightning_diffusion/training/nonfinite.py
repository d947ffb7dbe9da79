"""What the three models do when a training loss becomes NaN or infinite: stop, or skip the step (by option).

`model.nonfinite_loss: stop` (the default) raises `NonFiniteLossError` before the optimiser step, so the weights
(and every checkpoint written so far) stay finite; the CLI prints it as one `error:` line. `skip` leaves the
weights untouched for that step, warns, counts it (`train/skipped_nonfinite_steps`) and still stops after
`model.max_nonfinite_skips` skipped steps in a row (batch-norm running statistics, which the skipped step's forward
pass already updated, are put back too). Ranks decide together: the flag is summed over all ranks
first, so every rank skips or stops at the same step (a rank that skipped alone would hang DDP's reducer).
A checkpoint is never written from non-finite weights (`check_finite_weights` in `on_save_checkpoint`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_diffusion.errors import UserError

NonFiniteMode = Literal["stop", "skip"]
NONFINITE_MODES = ("stop", "skip")


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss (or the weights) became NaN or infinite; training stops instead of continuing on garbage."""


def any_rank_nonfinite(module: Any, values: list[Tensor]) -> float:
    """How many ranks saw a non-finite value among `values` at this step (one all-reduce of a scalar)."""
    finite = torch.stack([value.detach().float().reshape(-1) for value in values]).isfinite().all()
    flag = (~finite).float().reshape(1)
    if getattr(module, "_trainer", None) is not None:
        flag = module.trainer.strategy.reduce(flag, reduce_op="sum")
    return float(flag.item())


class NonFiniteGuard:
    """The stop/skip decision and the skip counters of one module."""

    def __init__(self, mode: str, max_skips: int, what: str, fix: str) -> None:
        if mode not in NONFINITE_MODES:
            raise UserError(f"model.nonfinite_loss must be 'stop' or 'skip', got {mode!r}")
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 1:
            raise UserError(f"model.max_nonfinite_skips must be a positive integer, got {max_skips!r}; set e.g. "
                            "model.max_nonfinite_skips: 10")
        self.mode, self.max_skips, self.what, self.fix = mode, max_skips, what, fix
        self.skipped = 0  # skipped steps since this process started
        self.in_a_row = 0
        self.skipping = False  # this step is being skipped (read by `drop_gradients`)
        self._norms: list[torch.nn.Module] | None = None
        self._stats: list[tuple[Tensor, Tensor]] = []

    def remember_norm_stats(self, module: torch.nn.Module) -> None:
        """Under `skip`, at the start of a training step: copy the batch-norm running statistics (a NaN batch
        would poison them in the forward pass, before the loss is seen)."""
        if self.mode != "skip":
            return
        if self._norms is None:
            self._norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self._stats = [(buffer, buffer.detach().clone()) for norm in self._norms for buffer in norm.buffers()]

    def skip_step(self, nonfinite_ranks: float, step: int, details: str) -> bool:
        """False for a finite step; True when this step is to be skipped; raises when training must stop. A skip
        holds until the next optimiser step (`drop_gradients`): with gradient accumulation, the whole window."""
        if nonfinite_ranks == 0:
            self.in_a_row = 0
            return False
        where = f"non-finite {self.what} loss at step {step} (on {int(nonfinite_ranks)} rank(s); here: {details})"
        if self.mode == "stop":
            raise NonFiniteLossError(f"{where}: stopped before the optimiser step, so the weights and the last "
                                     f"checkpoint stay finite; {self.fix}, or set model.nonfinite_loss: skip")
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_skips:
            raise NonFiniteLossError(f"{where}: {self.in_a_row} steps in a row skipped (model.max_nonfinite_skips "
                                     f"{self.max_skips}), so training stopped; {self.fix}")
        with torch.no_grad():
            for buffer, saved in self._stats:
                buffer.copy_(saved)
        rank_zero_warn(f"{where}: optimiser step skipped ({self.skipped} so far, {self.in_a_row} in a row)")
        self.skipping = True
        return True

    def drop_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """From `on_before_optimizer_step` (automatic optimisation): on a skipped step, no parameter has a gradient,
        so the optimiser leaves every weight (and its moments, and weight decay) as it is."""
        if self.skipping:
            optimizer.zero_grad(set_to_none=True)
        self.skipping = False

    def log_count(self, module: Any, batch_size: int) -> None:
        """`train/skipped_nonfinite_steps` at every step of a `skip` run (a flat 0 while nothing was skipped)."""
        if self.mode == "skip":
            module.log("train/skipped_nonfinite_steps", float(self.skipped), batch_size=batch_size)


def zero_loss(module: torch.nn.Module) -> Tensor:
    """The training-step result of a skipped step under automatic optimisation: exactly 0, with (zero) gradients
    for every trainable parameter. Lightning refuses `None` under DDP, and every rank must run the same backward."""
    return sum(parameter.sum() for parameter in module.parameters() if parameter.requires_grad) * 0.0


def check_finite_weights(checkpoint: dict[str, Any], what: str, step: int) -> None:
    """Refuse to write a checkpoint whose weights are not finite (the last good one stays on disk)."""
    for name, value in checkpoint.get("state_dict", {}).items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(value.isfinite().all()):
            raise NonFiniteLossError(f"the {what} weights are not finite at step {step} ({name}): the checkpoint "
                                     "was not written, so the last good one is kept; resume from it with a lower lr")
