"""Small helpers the sbatch templates call: which checkpoint to resume from, and a sweep task's overrides.

Resuming: on SIGUSR1 Lightning's `SLURMEnvironment(auto_requeue=True)` saves `hpc_ckpt_<n>.ckpt` into
`trainer.default_root_dir` and requeues the job; on restart, `fit(ckpt_path=None)` under SLURM restores the
highest-numbered `hpc_ckpt_*` there by itself (`_CheckpointConnector._parse_ckpt_path`). We add only what
Lightning does not do: when a job died without the signal (node failure, OOM, `scontrol requeue` by hand),
the newest `last*.ckpt` written by a `ModelCheckpoint` under the run folder is the state to resume from.

    python -m lightning_diffusion.training.slurm_job resume-args RUN_DIR            # NUL-separated fit arguments
    python -m lightning_diffusion.training.slurm_job task-args OVERRIDES.jsonl INDEX
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lightning_diffusion.errors import UserError


def _newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime, default=None)


def resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The `last*.ckpt` to pass as `--ckpt_path`, or None when Lightning's own HPC restore applies (or nothing).

    A `hpc_ckpt_*.ckpt` in `run_dir` newer than every `last*.ckpt` below it is left to Lightning, which
    restores it when `ckpt_path` is None; a newer `last*.ckpt` from a later step (training went on after the last
    requeue, then the job died without the signal) wins.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    last = _newest([p for p in run_dir.rglob("last*.ckpt") if p.is_file()])
    if last is None:
        return None
    hpc = _newest([p for p in run_dir.glob("hpc_ckpt_*.ckpt") if p.is_file()])
    if hpc is not None and hpc.stat().st_mtime >= last.stat().st_mtime:
        return None
    if hpc is not None and _step(last) <= _step(hpc):
        return None  # written on the way out after the requeue (training stops at the hpc step): the same state
    return last


def _step(checkpoint: Path) -> int:
    """The optimiser step a checkpoint holds (-1 when it cannot be read: the other one is then preferred)."""
    from lightning_diffusion.training.checkpoints import load_checkpoint

    try:
        state = load_checkpoint(checkpoint, what="checkpoint", key="resume", mmap=True)
    except UserError:
        return -1
    return int(state.get("global_step", -1)) if isinstance(state, dict) else -1


def override_args(overrides: dict[str, Any]) -> list[str]:
    """`{"model.init_args.lr": 0.001}` -> `["--model.init_args.lr=0.001"]` (non-strings as JSON, read by jsonargparse)."""
    args = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        args.append(f"--{key}={text}")
    return args


def task_overrides(path: str | Path, index: int) -> dict[str, Any]:
    """The override set of array task `index` (line `index` of the sweep's JSON-lines file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep overrides file '{path}' not found: run `python -m lightning_diffusion sweep` first")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not 0 <= index < len(lines):
        raise UserError(f"array task {index} has no line in '{path}' ({len(lines)} tasks): submit --array=0-{len(lines) - 1}")
    record = json.loads(lines[index])
    return record["overrides"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_diffusion.training.slurm_job", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    resume = sub.add_parser("resume-args", help="print `--ckpt_path PATH` when a last*.ckpt is the state to resume")
    resume.add_argument("run_dir")
    task = sub.add_parser("task-args", help="print the fit overrides of one sweep task")
    task.add_argument("overrides_file")
    task.add_argument("index", type=int)
    args = parser.parse_args(argv)
    try:
        if args.command == "resume-args":
            ckpt = resume_checkpoint(args.run_dir)
            out = ["--ckpt_path", str(ckpt)] if ckpt else []
        else:
            out = override_args(task_overrides(args.overrides_file, args.index))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    sys.stdout.write("".join(f"{arg}\0" for arg in out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
