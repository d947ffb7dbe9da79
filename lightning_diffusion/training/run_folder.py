"""One run, one folder: everything a `fit` writes goes under `trainer.default_root_dir`.

```
<default_root_dir>/
  config.yaml                 the resolved config (RunFolderConfig)
  checkpoints/                every ModelCheckpoint without a dirpath: best.ckpt, last.ckpt (pin_checkpoint_dirs)
  resume/step-*.ckpt          ResumeCheckpoint (lightning_diffusion.training.resume)
  hpc_ckpt_*.ckpt             SLURM requeue (Lightning / RequeueOnSignal)
  wandb/offline-run-*/        ProjectWandbLogger (lightning_diffusion.training.tracking)
  samples/, reconstructions/  image grids (the models write them into trainer.log_dir)
```

Lightning itself would put a `ModelCheckpoint` without `dirpath` under the first logger's
`<save_dir>/<name>/<version>/checkpoints` (`lightning_diffusion/<run id>/checkpoints` with W&B), a path no other
stage can name in advance; and `SaveConfigCallback` writes into the logger's `log_dir`. Here both go to fixed
places below the root, so `runs/vae_gan_tiny/checkpoints/last.ckpt` is known before the run starts and two runs
with two roots never share a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

from lightning_diffusion.errors import UserError

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.yaml"


def check_root(root: str | os.PathLike | None) -> None:
    """`trainer.default_root_dir` must be a folder (or not exist yet): a file there is a one-line user error."""
    if root is None or not _is_local_file_protocol(str(root)):
        return
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"trainer.default_root_dir '{root}' is a file, not a folder: "
                        "pass a new or existing folder for the run (e.g. --trainer.default_root_dir runs/my_run)")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"trainer.default_root_dir '{root}' lies below the file '{parent}': pass a folder "
                        "path for the run (e.g. --trainer.default_root_dir runs/my_run)")


def checkpoint_dir(trainer: Trainer) -> str:
    """`<default_root_dir>/checkpoints` (absolute for local paths, as ModelCheckpoint makes its own `dirpath`)."""
    root = str(trainer.default_root_dir)
    if _is_local_file_protocol(root):
        return os.path.realpath(os.path.join(os.path.expanduser(root), CHECKPOINTS))
    return f"{root.rstrip('/')}/{CHECKPOINTS}"


def pin_checkpoint_dirs(trainer: Trainer) -> list[ModelCheckpoint]:
    """Give every `ModelCheckpoint` without a `dirpath` the run's `checkpoints/` folder; returns those changed.

    A `dirpath` set in the config is kept (the user asked for that place).
    """
    pinned = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = checkpoint_dir(trainer)
            callback._fs = get_filesystem(callback.dirpath)
            pinned.append(callback)
    return pinned


class RunFolderConfig(SaveConfigCallback):
    """LightningCLI's config saving, but always to `<default_root_dir>/config.yaml` (not the first logger's
    `log_dir`, which for CSV/TensorBoard loggers is a `version_N` folder below it). `validate`/`test`/`predict` on
    a run's folder write `config-<stage>.yaml`, so the config the run was trained with stays."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - SaveConfigCallback's arguments
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        root = str(trainer.default_root_dir)
        fs = get_filesystem(root)
        fs.makedirs(root, exist_ok=True)
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        name = self.config_filename if stage == "fit" else f"{Path(self.config_filename).stem}-{stage}.yaml"
        path = os.path.join(root, name)
        self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
