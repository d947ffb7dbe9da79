"""`python -m lightning_diffusion sweep`: sweep files to override sets, the dry-run table and sbatch command,
and one-line errors for bad sweep files. (Submission on a real cluster: test_slurm_cluster.py.)"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from lightning_diffusion.cli import main
from lightning_diffusion.commands.sweep import expand, load_sweep
from lightning_diffusion.errors import UserError
from slurm_cluster import REPO


def write(tmp_path: Path, spec: object, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False) if not isinstance(spec, str) else spec)
    return path


def test_grid_is_every_combination_in_file_order(tmp_path: Path) -> None:
    sweep = load_sweep(write(tmp_path, {"parameters": {"a.lr": [1, 2, 3], "b.x": ["p", "q"]}}))
    tasks = expand(sweep)
    assert tasks == [{"a.lr": lr, "b.x": x} for lr in (1, 2, 3) for x in ("p", "q")]
    assert (sweep.name, sweep.method, sweep.max_parallel) == ("s", "grid", 4)


def test_random_is_seeded_and_within_bounds(tmp_path: Path) -> None:
    spec = {"method": "random", "count": 50, "seed": 3, "parameters": {
        "lr": {"distribution": "log_uniform", "min": 1e-4, "max": 1e-2},
        "w": {"distribution": "uniform", "min": -1.0, "max": 1.0},
        "n": {"distribution": "int_uniform", "min": 2, "max": 4},
        "loss": ["clip", "siglip"]}}
    tasks = expand(load_sweep(write(tmp_path, spec)))
    assert tasks == expand(load_sweep(write(tmp_path, spec, "again.yaml")))
    assert tasks != expand(load_sweep(write(tmp_path, {**spec, "seed": 4}, "other.yaml")))
    assert len(tasks) == 50
    assert all(1e-4 <= t["lr"] <= 1e-2 and -1 <= t["w"] <= 1 and t["n"] in (2, 3, 4) for t in tasks)
    assert {t["n"] for t in tasks} == {2, 3, 4} and {t["loss"] for t in tasks} == {"clip", "siglip"}
    logs = [math.log10(t["lr"]) for t in tasks]  # log-uniform: both decades drawn
    assert min(logs) < -3 < max(logs)


@pytest.mark.parametrize(("spec", "message"), [
    ("[1, 2]", "must be a mapping"),
    ("a: [", "not valid YAML"),
    ({"parameters": {}}, "empty grid"),
    ({"method": "grid"}, "empty grid"),
    ({"parameters": {"model.init_args.lr": 0.001}}, "must be a list of values"),
    ({"parameters": {"model.init_args.lr": []}}, "empty list"),
    ({"parameters": {"--lr": [1]}}, "dotted config key"),
    ({"method": "bayes", "parameters": {"a": [1]}}, "method 'bayes' is unknown"),
    ({"method": "random", "parameters": {"a": [1]}}, "`count` must be a positive integer"),
    ({"method": "random", "count": 2, "parameters": {"a": {"distribution": "log_uniform", "min": 0, "max": 1}}},
     "min <= max"),
    ({"count": 3, "parameters": {"a": [1]}}, "method: random only"),
    ({"parameter": {"a": [1]}}, "unknown key"),
    ({"config": "missing.yaml", "parameters": {"a": [1]}}, "config 'missing.yaml' not found"),
    ({"max_parallel": 0, "parameters": {"a": [1]}}, "max_parallel"),
])
def test_bad_sweep_files_are_user_errors(tmp_path: Path, spec: object, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_sweep(write(tmp_path, spec))


def test_unknown_format_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "sweep.toml"
    path.write_text("x = 1\n")
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown format '.toml'" in err and err.count("\n") == 1


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    spec = {"name": "lr", "config": "tests/slurm/tiny.yaml", "max_parallel": 2, "sbatch": ["--time=10"],
            "parameters": {"model.init_args.lr": [1.0e-3, 3.0e-4], "model.init_args.channels": [8, 16]}}
    sweep_file = write(tmp_path, spec)
    out = tmp_path / "sweeps"
    assert main(["sweep", str(sweep_file), "--dry-run", "--out", str(out), "--override", "trainer.max_steps=5"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]
    assert "W&B group: lr-<time>" in printed
    table = printed.splitlines()[1:6]
    assert table[0].split() == ["task", "model.init_args.lr", "model.init_args.channels"]
    assert table[4].split() == ["3", "0.0003", "16"]
    assert "every task also: trainer.max_steps=5" in printed
    command = printed.strip().splitlines()[-1]
    assert command.startswith("CONFIG=tests/slurm/tiny.yaml sbatch --parsable --array=0-3%2 --job-name=lr ")
    assert command.endswith(f"--time=10 slurm/sweep.sbatch '{out}/lr-<time>'")


def test_submit_writes_the_sweep_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--submit` with a stand-in `sbatch` on PATH that records its arguments and environment."""
    monkeypatch.chdir(REPO)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$CONFIG $*" > {tmp_path}/sbatch-args\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    spec = {"name": "lr", "config": "tests/slurm/tiny.yaml", "parameters": {"model.init_args.lr": [1.0e-3, 3.0e-4],
                                                                          "trainer.max_steps": [100]}}
    out = tmp_path / "sweeps"
    assert main(["sweep", str(write(tmp_path, spec)), "--submit", "--out", str(out),
                 "--override", "trainer.max_steps=5"]) == 0
    printed = capsys.readouterr().out
    (sweep_dir,) = out.iterdir()
    assert sweep_dir.name.startswith("lr-") and printed.strip().splitlines()[-1] == "4242"
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["submitted.json", "sweep.yaml", "tasks.jsonl"]
    lines = [json.loads(line) for line in (sweep_dir / "tasks.jsonl").read_text().splitlines()]
    assert lines == [{"index": 0, "overrides": {"model.init_args.lr": 1.0e-3, "trainer.max_steps": 5}},
                     {"index": 1, "overrides": {"model.init_args.lr": 3.0e-4, "trainer.max_steps": 5}}]
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text()) == spec
    assert json.loads((sweep_dir / "submitted.json").read_text())["job_id"] == "4242"
    assert (tmp_path / "sbatch-args").read_text().split() == [
        "tests/slurm/tiny.yaml", "--parsable", "--array=0-1%2", "--job-name=lr",
        f"--output={sweep_dir}/slurm-%A_%a.out", "slurm/sweep.sbatch", str(sweep_dir)]


@pytest.mark.parametrize(("parameters", "override", "named"), [
    ({"model.init_args.lrr": [1.0]}, [], "parameter 'model.init_args.lrr' of sweep file"),
    ({"model.init_args.lr": [1.0]}, ["--override", "trainer.max_stepz=3"], "--override key 'trainer.max_stepz'"),
])
def test_unknown_keys_are_one_line_errors_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
    parameters: dict, override: list[str], named: str,
) -> None:
    monkeypatch.chdir(REPO)
    path = write(tmp_path, {"config": "tests/slurm/tiny.yaml", "parameters": parameters})
    for mode in ("--dry-run", "--submit"):
        assert main(["sweep", str(path), mode, "--out", str(tmp_path / "sweeps"), *override]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {named}") and "tests/slurm/tiny.yaml" in err and err.count("\n") == 1, err
    assert not (tmp_path / "sweeps").exists()


def test_keys_are_those_lightningcli_resolves_defaults_and_short_forms_included(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_diffusion.commands.sweep import config_keys

    monkeypatch.chdir(REPO)
    keys = config_keys(("tests/slurm/tiny.yaml",))
    assert {"model.init_args.lr", "model.lr", "trainer.max_steps", "trainer.gradient_clip_val", "data.init_args.seed",
            "seed_everything"} <= keys  # gradient_clip_val and seed: defaults the file does not set
    assert "model.init_args.lrr" not in keys and "trainer.callbacks" in keys


def test_a_sweep_without_a_base_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert main(["sweep", str(write(tmp_path, {"parameters": {"model.init_args.lr": [1.0]}})), "--dry-run"]) == 2
    assert "names no `config:`" in capsys.readouterr().err
