"""Samples/s and model FLOP utilisation (MFU) of training, to the loggers (W&B) and the progress bar.

Lightning's ``ThroughputMonitor`` does the bookkeeping (a rolling window of times, samples and FLOPs; MFU = achieved
FLOP/s per device / the device's peak). This callback adds what it leaves to the model: the FLOPs of one training
batch, counted by ``torch.utils.flop_counter.FlopCounterMode`` around the first training batch (forward, backward
and any frozen encoders it runs; every matmul/convolution/attention FLOP, nothing else), and the peak, taken from
Lightning's table for the GPU and precision (``lightning.fabric.utilities.throughput.get_available_flops``) or
given as ``peak_flops`` (a CPU, a GPU missing from the table; the table's H200 and H100 NVL entries are peaks with
2:4 sparsity, about twice the dense ones: pass the dense peak there, e.g. 9.89e14 for bf16 on H100/H200 SXM). Only
training is measured: the time spent in validation is left out of the training rate. With gradient accumulation a
"batch" is one micro-batch.

Logged (every ``trainer.log_every_n_steps``, once ``window_size`` batches were seen): ``train/device/samples_per_sec``,
``train/device/batches_per_sec``, ``train/device/flops_per_sec``, ``train/device/mfu`` (with a peak) and, on several
devices, the totals without ``device/``. The progress bar shows ``samples/s`` and ``mfu``.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from lightning_diffusion.errors import check_positive


def batch_size(batch: Any) -> int:
    """Samples in a batch: the length of a dict batch's first tensor or list entry (``image``, ``latent``, ...)."""
    if isinstance(batch, dict):
        batch = next(value for value in batch.values() if isinstance(value, (Tensor, list)) and len(value))
    elif isinstance(batch, tuple):
        batch = batch[0]
    return len(batch)


class ThroughputMFU(ThroughputMonitor):
    """``ThroughputMonitor`` with the FLOPs per batch measured on the first batch and an optional given peak.

    Args:
        peak_flops: peak FLOP/s of one device for the run's precision; default: Lightning's table (None on a CPU or
            an unknown GPU: then FLOP/s are logged but no MFU).
        window_size: batches of the rolling average (at least 2).
        count_flops: False skips the FLOP count (samples/s only).
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 20, count_flops: bool = True) -> None:
        check_positive("ThroughputMFU.peak_flops", peak_flops, 989e12, integer=False, optional=True)
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 2:
            raise ValueError(f"ThroughputMFU.window_size must be an integer of at least 2, got {window_size!r}")
        super().__init__(batch_size_fn=batch_size, window_size=window_size)
        self.peak_flops = peak_flops
        self.count_flops = count_flops
        self.flops_per_batch: int | None = None
        self._counter: FlopCounterMode | None = None
        self._validation_start: float | None = None
        if not count_flops:
            self._module_has_flops = False  # no FLOPs on purpose: no "define flops_per_batch" warning

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:
            self.available_flops = int(self.peak_flops)
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops

    @rank_zero_only
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.count_flops and self.flops_per_batch is None and self._counter is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    @rank_zero_only
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops_per_batch = int(self._counter.get_total_flops())
            self._counter = None
        if self.flops_per_batch is not None:
            pl_module.flops_per_batch = self.flops_per_batch  # what ThroughputMonitor reads
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        metrics = self._throughputs[RunningStage.TRAINING].compute()
        shown = {"samples/s": metrics.get("device/samples_per_sec"), "mfu": metrics.get("device/mfu")}
        for name, value in shown.items():
            if value is not None:
                pl_module.log(name, float(value), prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._counter is not None:  # fit stopped inside the measured batch
            self._counter.__exit__(None, None, None)
            self._counter = None

    @rank_zero_only
    def on_validation_start(self, trainer: Trainer, *_: Any) -> None:
        self._validation_start = None if trainer.sanity_checking else time.perf_counter()

    def on_validation_batch_end(self, *_: Any, **__: Any) -> None:
        """Validation is not measured (its FLOPs per batch differ from training's)."""

    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, *_: Any) -> None:
        """Shift the training clock by the validation's duration, so that it does not count as training time."""
        if self._validation_start is not None and RunningStage.TRAINING in self._t0s:
            self._t0s[RunningStage.TRAINING] += time.perf_counter() - self._validation_start
        self._validation_start = None
