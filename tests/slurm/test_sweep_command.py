"""`python -m lightning_diffusion sweep`: sweep files to override sets, the dry-run table and sbatch command,
and one-line errors for bad sweep files. (Submission on a real cluster: test_slurm_cluster.py.)"""

from __future__ import annotations

import json
import math
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


def test_dry_run_writes_tasks_and_prints_table_and_sbatch(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    spec = {"name": "lr", "config": "tests/slurm/tiny.yaml", "max_parallel": 2, "sbatch": ["--time=10"],
            "parameters": {"model.init_args.lr": [1.0e-3, 3.0e-4], "model.init_args.channels": [8, 16]}}
    out = tmp_path / "sweeps"
    assert main(["sweep", str(write(tmp_path, spec)), "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    (sweep_dir,) = out.iterdir()
    assert sweep_dir.name.startswith("lr-") and f"W&B group: {sweep_dir.name}" in printed
    lines = [json.loads(line) for line in (sweep_dir / "tasks.jsonl").read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 2, 3]
    assert lines[3]["overrides"] == {"model.init_args.lr": 3.0e-4, "model.init_args.channels": 16}
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text()) == spec
    table = printed.splitlines()[1:6]
    assert table[0].split() == ["task", "model.init_args.lr", "model.init_args.channels"]
    assert table[4].split() == ["3", "0.0003", "16"]
    command = printed.strip().splitlines()[-1]
    assert command.startswith("CONFIG=tests/slurm/tiny.yaml sbatch --parsable --array=0-3%2 --job-name=lr ")
    assert command.endswith(f"--time=10 slurm/sweep.sbatch {sweep_dir}")
    assert not (sweep_dir / "submitted.json").exists()
