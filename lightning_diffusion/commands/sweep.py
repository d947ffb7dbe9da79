"""`python -m lightning_diffusion sweep SWEEP.yaml [--dry-run | --submit]`: a sweep file as one SLURM job array.

The sweep file names a base config and dotted config keys with the values to try:

    name: clip-lr                      # sweep folder prefix and W&B group (default: the file's name)
    config: configs/clip/tiny.yaml     # base config(s) every task starts from
    method: grid                       # grid: every combination; random: `count` draws with `seed`
    max_parallel: 2                    # tasks running at once (--array=0-N%K)
    parameters:
      model.init_args.lr: [1.0e-3, 3.0e-4]
      model.init_args.loss: [clip, siglip]
    sbatch: [--time=02:00:00]          # optional extra sbatch options

For `random`, a parameter is a list (drawn uniformly) or `{distribution: uniform | log_uniform | int_uniform,
min: A, max: B}`. `--override KEY=VALUE` sets a key for every task (it wins over the file's parameters), e.g. to
shorten a sweep for a try. Every key is checked against the base config resolved by LightningCLI (defaults
included) before anything is written or submitted.

`--dry-run` (the default) prints the plan and writes nothing. `--submit` writes the sweep folder and submits:

    <out>/<name>-<time>/              the W&B group of every task
      sweep.yaml  tasks.jsonl  submitted.json
      slurm-<array job>_<task>.out    each task's log (a requeued task appends to its own)
      runs/<cluster>-<array job>_<task>/   one run folder per task (its trainer.default_root_dir): config.yaml,
                                      checkpoints/, resume/, hpc_ckpt_*.ckpt, wandb/ (one W&B run per task)

`slurm/sweep.sbatch` runs `fit` for task i with line i of `tasks.jsonl`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from lightning_diffusion.errors import UserError

KNOWN_KEYS = {"name", "config", "method", "max_parallel", "parameters", "count", "seed", "sbatch"}
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file."""

    name: str
    configs: tuple[str, ...]
    method: str
    max_parallel: int
    parameters: dict[str, Any]
    count: int | None
    seed: int
    sbatch: tuple[str, ...]


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every mistake is a one-line `UserError` naming the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file '{path}' not found")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise UserError(f"sweep file '{path}': unknown format '{path.suffix}', write YAML (.yaml) or JSON (.json)")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"sweep file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(spec, dict):
        raise UserError(f"sweep file '{path}' must be a mapping with `parameters:` (see configs/sweeps/example.yaml)")
    unknown = sorted(set(spec) - KNOWN_KEYS)
    if unknown:
        raise UserError(f"sweep file '{path}': unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(KNOWN_KEYS))}")

    name = str(spec.get("name") or path.stem)
    if not _NAME.match(name):
        raise UserError(f"sweep file '{path}': name '{name}' may use only letters, digits, '_', '.', '-'")
    method = spec.get("method", "grid")
    if method not in ("grid", "random"):
        raise UserError(f"sweep file '{path}': method '{method}' is unknown, use grid or random")
    configs = spec.get("config") or []
    configs = [configs] if isinstance(configs, str) else configs
    if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise UserError(f"sweep file '{path}': `config` must be a path or a list of paths")
    for config in configs:
        if not Path(config).is_file():
            raise UserError(f"sweep file '{path}': config '{config}' not found (paths are relative to where you run the command)")
    max_parallel = _positive_int(spec.get("max_parallel", 4), "max_parallel", path)
    sbatch = spec.get("sbatch") or []
    if not isinstance(sbatch, list) or not all(isinstance(a, str) and a.startswith("-") for a in sbatch):
        raise UserError(f"sweep file '{path}': `sbatch` must be a list of sbatch options like --time=02:00:00")

    parameters = spec.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise UserError(f"sweep file '{path}': empty grid, add `parameters:` with dotted keys and lists of values")
    for key, values in parameters.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise UserError(f"sweep file '{path}': parameter '{key}' must be a dotted config key like model.init_args.lr")
        _check_values(key, values, method, path)

    count = None
    if method == "random":
        count = _positive_int(spec.get("count"), "count", path)
    elif "count" in spec:
        raise UserError(f"sweep file '{path}': `count` applies to method: random only (a grid runs every combination)")
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"sweep file '{path}': `seed` must be an integer")
    return Sweep(name, tuple(configs), method, max_parallel, dict(parameters), count, seed, tuple(sbatch))


def _positive_int(value: Any, key: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"sweep file '{path}': `{key}` must be a positive integer, got {value!r}")
    return value


def _check_values(key: str, values: Any, method: str, path: Path) -> None:
    if isinstance(values, list):
        if not values:
            raise UserError(f"sweep file '{path}': parameter '{key}' has an empty list of values")
        return
    if method == "random" and isinstance(values, dict):
        kind = values.get("distribution")
        if kind not in DISTRIBUTIONS or set(values) != {"distribution", "min", "max"}:
            raise UserError(f"sweep file '{path}': parameter '{key}' must be a list or "
                            f"{{distribution: {' | '.join(DISTRIBUTIONS)}, min: A, max: B}}")
        low, high = values["min"], values["max"]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if not numbers or low > high or (kind == "log_uniform" and low <= 0):
            raise UserError(f"sweep file '{path}': parameter '{key}' needs numbers min <= max (> 0 for log_uniform)")
        if kind == "int_uniform" and not all(isinstance(v, int) for v in (low, high)):
            raise UserError(f"sweep file '{path}': parameter '{key}' (int_uniform) needs integer min and max")
        return
    allowed = "a list of values" + (" or a distribution" if method == "random" else "")
    raise UserError(f"sweep file '{path}': parameter '{key}' must be {allowed}, got {values!r}")


def expand(sweep: Sweep) -> list[dict[str, Any]]:
    """The override sets, one per array task: every grid combination (in file order) or `count` seeded draws."""
    keys = list(sweep.parameters)
    if sweep.method == "grid":
        return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep.parameters[k] for k in keys))]
    rng = random.Random(sweep.seed)
    return [{key: _draw(sweep.parameters[key], rng) for key in keys} for _ in range(sweep.count or 0)]


def _draw(values: Any, rng: random.Random) -> Any:
    if isinstance(values, list):
        return rng.choice(values)
    low, high = values["min"], values["max"]
    if values["distribution"] == "uniform":
        return rng.uniform(low, high)
    if values["distribution"] == "log_uniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.randint(low, high)


def sbatch_command(sweep: Sweep, sweep_dir: Path, n_tasks: int, script: str, extra: list[str]) -> list[str]:
    """`sbatch` for the job array: tasks 0..N-1, at most `max_parallel` at once, logs in the sweep folder."""
    return [
        "sbatch", "--parsable",
        f"--array=0-{n_tasks - 1}%{min(sweep.max_parallel, n_tasks)}",
        f"--job-name={sweep.name}",
        f"--output={sweep_dir}/slurm-%A_%a.out",
        *sweep.sbatch, *extra, script, str(sweep_dir),
    ]


def write_sweep_dir(sweep: Sweep, source: Path, tasks: list[dict[str, Any]], out: Path) -> Path:
    """A new folder `<out>/<name>-<time>` with the sweep file and `tasks.jsonl`; its name is the W&B group."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    sweep_dir = out / f"{sweep.name}-{stamp}"
    suffix = 1
    while sweep_dir.exists():
        suffix += 1
        sweep_dir = out / f"{sweep.name}-{stamp}-{suffix}"
    sweep_dir.mkdir(parents=True)
    shutil.copyfile(source, sweep_dir / f"sweep{source.suffix}")
    with open(sweep_dir / "tasks.jsonl", "w") as f:
        for index, overrides in enumerate(tasks):
            f.write(json.dumps({"index": index, "overrides": overrides}) + "\n")
    return sweep_dir


def format_table(tasks: list[dict[str, Any]]) -> str:
    """One row per task: its index and the value of every swept key."""
    keys = list(tasks[0])
    rows = [["task", *keys]] + [[str(i), *(_show(t[k]) for k in keys)] for i, t in enumerate(tasks)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if not isinstance(value, str) else value


def parse_overrides(texts: list[str]) -> dict[str, Any]:
    """`--override KEY=VALUE` (VALUE is YAML) into `{key: value}`; a malformed one is a one-line error."""
    overrides: dict[str, Any] = {}
    for text in texts:
        key, sep, raw = text.partition("=")
        if not sep or not _KEY.match(key):
            raise UserError(f"--override {text!r}: write KEY=VALUE with a dotted config key, e.g. trainer.max_steps=100")
        try:
            overrides[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise UserError(f"--override {text!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from err
    return overrides


def config_keys(configs: tuple[str, ...]) -> set[str]:
    """Every dotted key of the base config as LightningCLI resolves it (`fit --print_config`: defaults and the
    chosen classes' init_args included); nested mappings give their parents' keys too, and `model.init_args.lr`
    also counts as `model.lr` (jsonargparse's short form)."""
    from lightning_diffusion.cli import run_lightning

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        run_lightning(["fit", *(arg for config in configs for arg in ("--config", config)), "--print_config"])
    resolved = yaml.safe_load(printed.getvalue())
    if not isinstance(resolved, dict):
        raise UserError(f"could not resolve the base config {' '.join(configs)}: check it with "
                        f"`python -m lightning_diffusion fit --config {configs[0]} --print_config`")
    keys: set[str] = set()

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            keys.add(f"{prefix}{key}")
            keys.add(f"{prefix}{key}".replace(".init_args.", "."))
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(resolved, "")
    return keys


def check_keys(sweep: Sweep, source: str, overrides: dict[str, Any]) -> None:
    """Every parameter and override key must be a key of the resolved base config: one line naming it otherwise."""
    if not sweep.configs:
        raise UserError(f"sweep file '{source}' names no `config:`: set the base config(s) every task starts from, "
                        "e.g. config: configs/clip/tiny.yaml")
    known = config_keys(sweep.configs)
    named = [(key, f"parameter '{key}' of sweep file '{source}'") for key in sweep.parameters]
    named += [(key, f"--override key '{key}'") for key in overrides]
    for key, where in named:
        if key not in known:
            raise UserError(f"{where} is not a key of the config {' '.join(sweep.configs)} (see `python -m "
                            f"lightning_diffusion fit --config {sweep.configs[0]} --print_config`)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_file", help="the sweep file (see configs/sweeps/example.yaml)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and the sbatch command, write nothing (default)")
    mode.add_argument("--submit", action="store_true", help="write the sweep folder, submit the job array, print its id")
    parser.add_argument("--out", default="runs/sweeps", help="folder for sweep folders (default: runs/sweeps)")
    parser.add_argument("--script", default="slurm/sweep.sbatch", help="the job-array template")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="extra sbatch option, repeatable: --sbatch=--partition=gpu")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="set a config key for every task, over the sweep's parameters (VALUE is YAML; repeatable): "
                             "--override trainer.max_steps=100")


def run(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep_file)
    if not Path(args.script).is_file():
        raise UserError(f"job-array template '{args.script}' not found: run from the repository root or pass --script")
    overrides = parse_overrides(args.override)
    check_keys(sweep, args.sweep_file, overrides)
    tasks = [{**task, **overrides} for task in expand(sweep)]
    planned = Path(args.out) / f"{sweep.name}-<time>"
    print(f"sweep {sweep.name}: {len(tasks)} task(s), {sweep.method}, at most "
          f"{min(sweep.max_parallel, len(tasks))} at once; folder and W&B group: {planned.name}")
    print(format_table([{k: v for k, v in task.items() if k not in overrides} for task in tasks]))
    if overrides:
        print("every task also: " + " ".join(f"{k}={_show(v)}" for k, v in overrides.items()))
    env = {"CONFIG": " ".join(sweep.configs)}
    if not args.submit:
        command = sbatch_command(sweep, planned, len(tasks), args.script, args.sbatch)
        print("\n" + " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command)]))
        return 0
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: submit from a SLURM login node, or use --dry-run to see the command")
    sweep_dir = write_sweep_dir(sweep, Path(args.sweep_file), tasks, Path(args.out))
    command = sbatch_command(sweep, sweep_dir, len(tasks), args.script, args.sbatch)
    shown = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command)])
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(sweep_dir)  # nothing half-written: no job refers to it
        message = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"sbatch failed ({message}); command: {shown}")
    job_id = result.stdout.strip().split(";")[0]
    (sweep_dir / "submitted.json").write_text(json.dumps({"job_id": job_id, "command": shown}) + "\n")
    print(f"submitted job array {job_id} into {sweep_dir}: logs slurm-{job_id}_<task>.out, run folders "
          f"runs/<cluster>-{job_id}_<task>/; compare with `python -m lightning_diffusion compare {sweep_dir}`")
    print(job_id)
    return 0
