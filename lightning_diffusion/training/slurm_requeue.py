"""Save-and-requeue on SLURM's warning signal at a step boundary, so it cannot deadlock DDP.

Lightning's `SLURMEnvironment(auto_requeue=True)` saves `hpc_ckpt_<n>.ckpt` and calls `scontrol requeue`
inside the SIGUSR1 handler. Under DDP the handler runs wherever each rank happens to be: a rank inside a
gradient all-reduce cannot enter it while another rank waits in the checkpoint barrier, and the job hangs
until SLURM kills it (reproduced by tests/slurm with 2 gloo ranks; Lightning issue #21406). This callback
installs its own handler first (Lightning then leaves SIGUSR1 alone), which only sets a flag; after every
training batch the ranks agree on the flag with one boolean all-reduce, then all save the same
`hpc_ckpt_<n>.ckpt` in `default_root_dir`, rank 0 requeues the job and training stops. On restart
Lightning restores the newest `hpc_ckpt_*` by itself (`ckpt_path=None` under SLURM), as with its own handler.
The sbatch templates add it with `--trainer.callbacks+=lightning_diffusion.training.slurm_requeue.RequeueOnSignal`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


class RequeueOnSignal(L.Callback):
    """On `signal_name` (SIGUSR1, as `#SBATCH --signal=SIGUSR1@90` sends), checkpoint at the next step and requeue."""

    def __init__(self, signal_name: str = "SIGUSR1") -> None:
        self.signum = signal.Signals[signal_name]
        self.received = False
        self._previous: Any = None
        self._installed = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not SLURMEnvironment.detect() or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(self.signum, self._on_signal)
        self._installed = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = True  # only a flag: the work happens at the next step boundary, on every rank at once

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._installed or not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        # Lightning's own naming (hpc_ckpt_<max+1>.ckpt in default_root_dir), so its automatic restore finds it;
        # rank 0 names it for everyone (another rank looking later could already see rank 0's new file).
        path = trainer.strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        log.warning(f"{self.signum.name} received: saving {path} at step {trainer.global_step} and requeueing")
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            requeue()
        trainer.should_stop = True
        self.received = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._installed:
            # SIGUSR1's default action kills the process: a warning that comes after the last step (SLURM sends it
            # up to a minute early) would turn a run that is saving its last checkpoint or syncing W&B into a failed
            # job. With nothing left to save, it is only logged.
            default = self._previous in (signal.SIG_DFL, None)
            signal.signal(self.signum, _after_training if default else self._previous)
            self._installed = False


def _after_training(signum: int, frame: FrameType | None) -> None:
    log.warning(f"{signal.Signals(signum).name} received after training ended: nothing to save or requeue")


def slurm_job_key() -> str:
    """The id `scontrol requeue` takes: `ARRAYJOB_TASK` for array tasks (requeues only that task), else the job id."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue() -> None:
    """`scontrol requeue` this job; a failure is logged, not raised (the checkpoint is already saved)."""
    key = slurm_job_key()
    result = subprocess.run(["scontrol", "requeue", key], capture_output=True, text=True)
    if result.returncode == 0:
        log.warning(f"requeued SLURM job {key}")
    else:
        log.warning(f"`scontrol requeue {key}` failed ({result.returncode}): {result.stderr.strip()}")
