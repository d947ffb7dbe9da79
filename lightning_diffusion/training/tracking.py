"""Experiment tracking: the default W&B logger (offline unless told otherwise), config logging, image grids.

Every `fit` gets `ProjectWandbLogger` unless the config sets `trainer.logger` (a CSV or TensorBoard logger,
or `false`). The W&B run id is stable across resume and SLURM requeue, so a resumed job appends to the same run:
explicit `id` > `WANDB_RUN_ID` > the SLURM job (array job + task) id and a hash of the run dir > the id saved in
`<save_dir>/wandb/run_id` when fit resumes from a checkpoint > a new id. Offline runs land in
`<save_dir>/wandb/offline-run-*` (`wandb sync` uploads them later); wandb's own debug logs go to
`$XDG_CACHE_HOME/wandb` (default `~/.cache/wandb`).
"""

from __future__ import annotations

import hashlib
import math
import netrc
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor

PROJECT = "lightning_diffusion"
RUN_ID_FILE = "run_id"
CONFIG_FILE = "config.yaml"


def stable_run_id(explicit: str | None = None) -> str | None:
    """The run id a restarted job must reuse, or None when nothing pins it (wandb then makes a new one)."""
    if explicit:
        return explicit
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    return _slurm_run_id()


def _slurm_run_id() -> str | None:
    """`slurm-<array job>-<task>` or `slurm-<job>`: a requeued job keeps its SLURM_JOB_ID."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm-{os.environ['SLURM_ARRAY_JOB_ID']}-{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return None


def default_mode() -> str:
    """`WANDB_MODE` when set, else online only if an API key is configured (env or ~/.netrc), else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        has_login = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        has_login = False
    return "online" if has_login else "offline"


class ProjectWandbLogger(WandbLogger):
    """`WandbLogger` with the project's defaults: offline unless configured, stable run id, run dir under the
    trainer's `default_root_dir` (when `save_dir` is not given), name/group/tags from the config, and the run
    finished at the end of fit so the next logger in the same process starts its own run.
    """

    def __init__(
        self,
        name: str | None = None,
        project: str = PROJECT,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        job_type: str | None = None,
        save_dir: str | None = None,
        id: str | None = None,  # noqa: A002 - wandb's name
        mode: str | None = None,
        log_model: bool = False,
    ) -> None:
        self._save_dir_from_trainer = save_dir is None
        super().__init__(
            name=name,
            project=project,
            save_dir=save_dir or ".",
            id=stable_run_id(id),
            log_model=log_model,
            group=group,
            tags=list(tags) if tags else None,
            notes=notes,
            job_type=job_type,
            mode=mode or default_mode(),
        )
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb; passing it (even None) warns
        self._run_id_saved = False

    def attach(self, trainer: Trainer, resuming: bool) -> None:
        """Before the run starts: put it under the trainer's root dir; on resume, reuse the saved run id."""
        if self._experiment is not None:
            return
        if self._save_dir_from_trainer:
            self._save_dir = self._wandb_init["dir"] = str(trainer.default_root_dir)
        slurm_id = _slurm_run_id()
        if slurm_id is not None and self._wandb_init.get("id") == slurm_id:
            # several fits in one job (e.g. the three stages) must not share a run: tell them apart by run dir
            digest = hashlib.sha1(str(Path(self.save_dir or ".").resolve()).encode()).hexdigest()[:8]
            self._id = self._wandb_init["id"] = f"{slurm_id}-{digest}"
        if resuming and self._wandb_init.get("id") is None and self.run_id_file.is_file():
            self._id = self._wandb_init["id"] = self.run_id_file.read_text().strip()

    @property
    def run_id_file(self) -> Path:
        return Path(self.save_dir or ".") / "wandb" / RUN_ID_FILE

    @property
    def experiment(self) -> Any:  # noqa: ANN401 - wandb's Run (or a dummy on non-zero ranks)
        run = super().experiment
        if rank_zero_only.rank == 0 and not self._run_id_saved and getattr(run, "id", None):
            self.run_id_file.parent.mkdir(parents=True, exist_ok=True)
            self.run_id_file.write_text(run.id)
            self._run_id_saved = True
        return run

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None
            self._run_id_saved = False


def default_logger_config() -> dict[str, Any]:
    """The `trainer.logger` default for LightningCLI (class_path form, so `--print_config` shows it)."""
    return {"class_path": f"{__name__}.ProjectWandbLogger", "init_args": {"project": PROJECT}}


def prepare_loggers(trainer: Trainer, config_yaml: str, config: dict[str, Any], resuming: bool) -> None:
    """Called by the CLI before fit: attach W&B loggers to the run dir and log the resolved config to them,
    as hyperparameters and as `config.yaml` in the run's files (the CLI's config never reaches W&B by itself).
    """
    for logger in trainer.loggers:
        if isinstance(logger, ProjectWandbLogger):
            logger.attach(trainer, resuming)
        if isinstance(logger, WandbLogger):
            _log_config_to_wandb(logger, config_yaml, config)


@rank_zero_only
def _log_config_to_wandb(logger: WandbLogger, config_yaml: str, config: dict[str, Any]) -> None:
    logger.log_hyperparams(config)
    run = logger.experiment
    run_dir = getattr(run, "dir", None)
    if run_dir and Path(run_dir).is_dir():  # WANDB_MODE=disabled gives a dummy run whose dir does not exist
        path = Path(run_dir) / CONFIG_FILE
        path.write_text(config_yaml)
        run.save(str(path), base_path=run_dir, policy="now")


def to_uint8_grid(images: Tensor, nrow: int | None = None) -> np.ndarray:
    """[-1, 1] images `[B, C, H, W]` -> one uint8 `[H', W', 3]` grid (float images show black in W&B)."""
    from torchvision.utils import make_grid

    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid((images + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def log_image_grid(loggers: list[Logger], key: str, images: Tensor, step: int, caption: str | None = None) -> None:
    """Log [-1, 1] images as one uint8 grid to every logger that takes images (W&B, TensorBoard)."""
    grid = to_uint8_grid(images)
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [grid], step=step, caption=[caption] if caption else None)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, step, dataformats="HWC")
