"""The CLI entry: help, config printing, merged configs, overrides, and one-line user errors (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_diffusion.cli import _one_line, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BORING = ["--model", "lightning.pytorch.demos.boring_classes.BoringModel",
          "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "lightning_diffusion", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict"):
        assert f"  {command} " in out


def test_print_config_merges_configs_and_overrides(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"class_path": BORING[1]}, "data": {"class_path": BORING[3]},
                                    "trainer": {"max_steps": 5, "logger": False}}))
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"trainer": {"max_steps": 7, "log_every_n_steps": 3}}))
    result = run_cli("fit", "--config", str(base), "--config", str(extra), "--trainer.log_every_n_steps", "11",
                     "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["trainer"]["max_steps"] == 7  # later --config wins
    assert printed["trainer"]["log_every_n_steps"] == 11  # dotted override wins over both
    assert printed["model"]["class_path"] == BORING[1]
    assert printed["trainer"]["precision"] == "32-true"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fit", "--config", "missing.yaml"], "missing.yaml"),
        (["fit", *BORING, "--model.not_a_key", "3"], "not_a_key"),
        (["fit", *BORING, "--trainer.max_steps", "many"], "trainer.max_steps"),
        (["fit", "--model", "lightning.pytorch.demos.boring_classes.NoSuchModel", "--data", BORING[3]], "NoSuchModel"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        # a UserError raised by a model's constructor, wrapped by jsonargparse on the way out
        (["fit", "--config", str(CONFIGS / "denoiser" / "latent_text_tiny.yaml")], "model.vae_checkpoint"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "a failed parse must not write anything"


def test_one_line_condenses_nested_jsonargparse_message() -> None:
    message = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'pkg.Model':
        Option 'foo' is not accepted
    - Expected a <class 'NoneType'>
  Given value type: <class 'str'>"""
    assert _one_line(message) == "key \"model\": class_path 'pkg.Model': Option 'foo' is not accepted"
