"""Tracking: the default offline W&B run holds config, scalar history and uint8 images; resume keeps the run id;
CSV and `logger: false` still work."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from PIL import Image

from lightning_diffusion.cli import main
from lightning_diffusion.training.run_logs import RunLog, find_runs
from lightning_diffusion.training.tracking import default_mode, log_image_grid, stable_run_id, to_uint8_grid

BORING_DATA = "lightning.pytorch.demos.boring_classes.BoringDataModule"


class TinyLoggingModel(LightningModule):
    """32 -> 2 linear model on Lightning's BoringDataModule; logs a loss and an image grid."""

    def __init__(self, lr: float = 0.1, width: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(32, width)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss)
        if batch_idx == 1:
            ramp = torch.linspace(-1, 1, 8 * 8).reshape(1, 1, 8, 8).expand(4, 3, 8, 8)
            log_image_grid(self.loggers, "samples", ramp, step=self.global_step, caption="ramp")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


MODEL = f"{TinyLoggingModel.__module__}.{TinyLoggingModel.__qualname__}"


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline W&B with every wandb folder (runs, debug logs, settings) inside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_RUN_ID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def fit(root: Path, *extra: str, steps: int = 4) -> None:
    args = ["fit", "--model", MODEL, "--data", BORING_DATA, "--trainer.max_steps", str(steps),
            "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(root), *extra]
    assert main(args) == 0


def written_runs(root: Path, timeout: float = 30.0) -> list[RunLog]:
    """The runs under `root` once wandb's service has written every run's exit record (it writes asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = find_runs(root)
        if (runs and all(run.finished for run in runs)) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def test_offline_wandb_run_holds_config_history_and_uint8_images(offline_wandb: Path) -> None:
    root = offline_wandb / "run"
    fit(root, "--model.lr", "0.05", "--trainer.logger.init_args.name", "first",
        "--trainer.logger.init_args.group", "sweep-a", "--trainer.logger.init_args.tags", "[tiny, test]")
    (run,) = written_runs(root)
    assert run.path.parent == root / "wandb" and run.path.name.startswith("offline-run-")
    assert (run.name, run.group, run.tags) == ("first", "sweep-a", ["tiny", "test"])
    assert run.config["model.init_args.lr"] == 0.05 and run.config["trainer.max_steps"] == 4  # the CLI config
    assert [step for step, _ in run.history["train/loss"]] == [0, 1, 2, 3]
    assert "samples" in run.images
    config_file = run.path / "files" / "config.yaml"
    assert "lr: 0.05" in config_file.read_text()
    (png,) = (run.path / "files" / "media" / "images").glob("samples_*.png")
    pixels = np.asarray(Image.open(png))
    assert pixels.dtype == np.uint8 and pixels.std() > 10  # not a black float image


def test_resumed_fit_continues_the_same_wandb_run(offline_wandb: Path) -> None:
    root = offline_wandb / "run"
    fit(root, steps=2)
    (first,) = written_runs(root)
    (checkpoint,) = root.rglob("*.ckpt")
    fit(root, "--ckpt_path", str(checkpoint), steps=4)
    folders = sorted((root / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all((folder / f"run-{first.run_id}.wandb").is_file() for folder in folders)
    (merged,) = written_runs(root)
    assert merged.run_id == first.run_id
    assert [step for step, _ in merged.history["train/loss"]] == [0, 1, 2, 3]


def test_slurm_job_pins_the_run_id_per_run_dir(offline_wandb: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    fit(offline_wandb / "a", steps=1)
    fit(offline_wandb / "b", steps=1)  # another stage in the same job: another run
    fit(offline_wandb / "a", steps=1)  # the requeued job: the same run
    ids = {name: {run.run_id for run in written_runs(offline_wandb / name)} for name in ("a", "b")}
    assert len(ids["a"]) == 1 and len(ids["b"]) == 1 and ids["a"] != ids["b"]
    assert all(run_id.startswith("slurm-4242-") for run_ids in ids.values() for run_id in run_ids)
    assert len(list((offline_wandb / "a" / "wandb").glob("offline-run-*"))) == 2


def test_csv_logger_and_no_logger_still_work(offline_wandb: Path) -> None:
    csv_root = offline_wandb / "csv"
    fit(csv_root, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir", str(csv_root), steps=3)
    (run,) = find_runs(csv_root)
    assert run.kind == "csv" and len(run.history["train/loss"]) == 3 and run.config["model.init_args.lr"] == 0.1
    assert not (csv_root / "wandb").exists()
    fit(offline_wandb / "none", "--trainer.logger", "false", steps=2)
    assert not (offline_wandb / "none" / "wandb").exists()


def test_run_id_is_pinned_by_env_and_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_RUN_ID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert stable_run_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert stable_run_id() == "slurm-77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert stable_run_id() == "slurm-70-3"
    monkeypatch.setenv("WANDB_RUN_ID", "mine")
    assert stable_run_id() == "mine" and stable_run_id("explicit") == "explicit"


def test_mode_is_offline_unless_a_key_or_wandb_mode_says_otherwise(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert default_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert default_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert default_mode() == "disabled"


def test_uint8_grid_maps_minus_one_to_zero_and_one_to_255() -> None:
    images = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 1.0)])
    grid = to_uint8_grid(images, nrow=2)
    assert grid.dtype == np.uint8 and grid.shape == (8, 14, 3)
    assert grid[2, 2].tolist() == [0, 0, 0] and grid[2, 8].tolist() == [255, 255, 255]
