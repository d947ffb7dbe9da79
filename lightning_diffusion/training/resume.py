"""Exact resume: atomic checkpoints every N optimiser steps (the last k kept), auto-resume, per-step seeds.

A run killed at any point (SIGKILL, node failure, pre-emption without warning) and restarted with the same
command continues from its newest `step-<global step>.ckpt` and trains on the same batches, with the same random
draws, to the same weights as a run that was never interrupted (CPU, deterministic mode; tests/test_exact_resume.py):

- `ResumeCheckpoint` (a callback: `trainer.callbacks` in the config) saves `<dirpath>/step-<step>.ckpt` every
  `every_n_train_steps` optimiser steps and deletes all but the newest `keep_last`. `dirpath` defaults to
  `<trainer.default_root_dir>/resume`, a fixed folder, so the next run finds it.
- Every checkpoint the trainer writes (these, `ModelCheckpoint`'s, SLURM's `hpc_ckpt_*`) goes through
  `AtomicCheckpointIO`: a hidden temporary file in the same folder, fsync, then `os.replace`. A crash mid-write
  leaves the previous file whole and a stray temporary file, never a truncated checkpoint.
- The CLI's `fit` without `--ckpt_path` resumes from `auto_resume_path(trainer)`: the newest `step-*.ckpt`,
  unless a SLURM `hpc_ckpt_*` is newer (Lightning restores that one itself, as before).
- With `reseed` (default), the global torch / numpy / random generators are seeded before every training batch
  from (seed, epoch, batch index, rank): noise, timesteps and dropout of a step do not depend on what ran before
  it (validation, a restart), so nothing about the generators needs saving. The data position is saved by the
  DataModule (`data_pipelines/datamodule.py`).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from data_pipelines.epoch_plan import derive_seed
from lightning_diffusion.errors import UserError
from lightning_diffusion.training.checkpoints import WeightsOnlyCheckpointIO

STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:  # noqa: ANN401 - any picklable checkpoint
    """`torch.save` to a hidden temporary file next to `path`, fsync, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


class AtomicCheckpointIO(WeightsOnlyCheckpointIO):
    """Lightning's torch checkpoint IO, but local files are replaced atomically (see `atomic_save`) and every
    load is weights-only (`WeightsOnlyCheckpointIO`: resume, `--ckpt_path`, SLURM's `hpc_ckpt_*`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,  # noqa: ANN401 - str or PathLike
                        storage_options: Any = None) -> None:  # noqa: ANN401
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)


def install_atomic_io(trainer: L.Trainer, allow_url: bool | None = None) -> None:
    """Make the strategy write atomically and load weights-only, unless it was given another checkpoint IO (that
    one is left alone; the CLI refuses one that does not load weights-only). `allow_url` (when given) lets
    `--ckpt_path` be a URL."""
    strategy = trainer.strategy
    current = getattr(strategy, "checkpoint_io", None)
    if type(current) is TorchCheckpointIO:
        current = strategy.checkpoint_io = AtomicCheckpointIO()
    if isinstance(current, WeightsOnlyCheckpointIO):
        if allow_url is not None:
            current.allow_url = allow_url
    if isinstance(current, AtomicCheckpointIO):
        return
    rank_zero_warn(f"checkpoints are written by {type(current).__name__}, not atomically: a crash mid-write can "
                   "leave a truncated file (use lightning_diffusion.training.resume.AtomicCheckpointIO for exact resume)")


def step_checkpoints(dirpath: str | os.PathLike) -> dict[int, Path]:
    """`step-<n>.ckpt` files in `dirpath` by step (complete files only: they are written atomically)."""
    folder = Path(dirpath)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = STEP_FILE.match(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return found


def prune(dirpath: str | os.PathLike, step: int, keep_last: int) -> None:
    """Keep the newest `keep_last` step checkpoints up to `step`; later ones belong to an abandoned run."""
    found = step_checkpoints(dirpath)
    kept = sorted(s for s in found if s <= step)[-keep_last:]
    for other, path in found.items():
        if other not in kept:
            path.unlink(missing_ok=True)


def seed_step(seed: int, epoch: int, batch_idx: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random for one training batch."""
    value = derive_seed("train-step", seed, epoch, batch_idx, rank)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


class ResumeCheckpoint(Checkpoint):
    """Atomic `step-<n>.ckpt` every `every_n_train_steps` optimiser steps, newest `keep_last` kept; the CLI resumes
    from the newest one (`auto_resume`). `reseed` seeds the generators per batch (see the module docstring).

    List it after any `ModelCheckpoint` (Lightning's `ckpt_path="best"` asks the first checkpoint callback).
    """

    best_model_path = ""  # not a "best" checkpoint: `ckpt_path="best"` must not pick these

    def __init__(self, every_n_train_steps: int = 500, keep_last: int = 2, dirpath: str | None = None,
                 auto_resume: bool = True, reseed: bool = True, seed: int | None = None) -> None:
        for key, value in (("every_n_train_steps", every_n_train_steps), ("keep_last", keep_last)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"ResumeCheckpoint {key} must be a positive integer, got {value!r}; e.g. {key}: 2")
        self.every_n_train_steps, self.keep_last, self.dirpath = every_n_train_steps, keep_last, dirpath
        self.auto_resume, self.reseed, self.seed = auto_resume, reseed, seed
        self._step_at_batch_start = -1

    def resolve_dirpath(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath is not None else Path(trainer.default_root_dir) / "resume"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        install_atomic_io(trainer)
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # what seed_everything (the CLI's too) set
        self.folder = self.resolve_dirpath(trainer)
        if trainer.is_global_zero and self.folder.is_dir():
            for stray in self.folder.glob(".step-*.ckpt.tmp-*"):  # left by a crash mid-write
                stray.unlink(missing_ok=True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,  # noqa: ANN401
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step
        if self.reseed:
            seed_step(int(self.seed), trainer.current_epoch, batch_idx, trainer.global_rank)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,  # noqa: ANN401
                           batch: Any, batch_idx: int) -> None:  # noqa: ANN401
        step = trainer.global_step
        stepped = step != self._step_at_batch_start  # not mid gradient accumulation (its gradients are not saved)
        if stepped and step % self.every_n_train_steps == 0:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        """Write `step-<global step>.ckpt` (every rank takes part, rank 0 writes) and prune the folder."""
        path = self.folder / f"step-{trainer.global_step:09d}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero:
            prune(self.folder, trainer.global_step, self.keep_last)
        return path


def auto_resume_path(trainer: L.Trainer) -> str | None:
    """The checkpoint `fit` should resume from when none is given: the newest `step-*.ckpt` of an auto-resuming
    `ResumeCheckpoint`, or None (fresh start; or a newer SLURM `hpc_ckpt_*`, which Lightning restores itself)."""
    newest: Path | None = None
    for callback in trainer.callbacks:
        if isinstance(callback, ResumeCheckpoint) and callback.auto_resume:
            found = step_checkpoints(callback.resolve_dirpath(trainer))
            if found and (newest is None or found[max(found)].stat().st_mtime > newest.stat().st_mtime):
                newest = found[max(found)]
    if newest is None:
        return None
    hpc = trainer._checkpoint_connector._hpc_resume_path if SLURMEnvironment.detect() else None
    if hpc is not None and os.path.getmtime(hpc) >= newest.stat().st_mtime:
        return None
    return str(newest)
