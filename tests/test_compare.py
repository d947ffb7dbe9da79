"""`compare` over real tiny runs (offline W&B by group, and CSV logs by folder): table, JSON and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_diffusion.cli import main
from test_tracking import fit, offline_wandb, written_runs  # noqa: F401 - fixture re-used

pytestmark = pytest.mark.usefixtures("offline_wandb")


def assert_real_png(path: Path, size: tuple[int, int]) -> None:
    image = Image.open(path)
    image.load()
    assert image.size == size
    assert np.asarray(image.convert("RGB")).std() > 0


def test_compare_wandb_group(offline_wandb: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    root = offline_wandb / "runs"
    for lr in ("0.5", "0.01"):
        fit(root / f"lr{lr}", "--model.lr", lr, "--trainer.logger.init_args.group", "lr-sweep",
            "--trainer.logger.init_args.name", f"lr={lr}", steps=6)
    fit(root / "other", "--trainer.logger.init_args.group", "other-group", steps=2)
    assert len(written_runs(root)) == 3
    capsys.readouterr()

    out = offline_wandb / "report"
    assert main(["compare", "--group", "lr-sweep", "--root", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.init_args.lr" in printed and "train/loss final" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(row["run"] for row in summary["runs"]) == ["lr=0.01", "lr=0.5"]  # not the other group
    assert set(summary["hparams"]) == {"model.init_args.lr"}  # only the swept value differs
    for row in summary["runs"]:
        assert row["train/loss/best"] <= row["train/loss/final"]
    assert (out / "table.txt").read_text().strip() == printed.split("\nwrote ")[0].strip()
    assert_real_png(out / "curves_train_loss.png", (600, 400))
    assert_real_png(out / "train_loss_vs_model.init_args.lr.png", (500, 400))


def test_compare_csv_run_folders(offline_wandb: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    folders = []
    for width in ("2", "5"):
        folder = offline_wandb / f"w{width}"
        fit(folder, "--model.width", width, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir", str(folder), steps=5)
        folders.append(str(folder))
    capsys.readouterr()
    assert main(["compare", *folders]) == 0
    out = offline_wandb / "compare-runs"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hparams"] == {"model.init_args.width": [2, 5]}
    assert all(len(str(row["train/loss/final"])) for row in summary["runs"])
    assert_real_png(out / "curves_train_loss.png", (600, 400))
    assert_real_png(out / "train_loss_vs_model.init_args.width.png", (500, 400))


def test_compare_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert main(["compare", "--group", "nope", "--root", str(tmp_path)]) == 2
    assert "no run of group 'nope'" in capsys.readouterr().err
