"""configs/sweeps/example.yaml on the local SLURM cluster: a throttled job array of the real CLIP stage, one task
requeued by SIGUSR1 mid-run; every task in its own run folder and W&B run, one W&B group, `compare` over the folder.

The sweep is the example file itself, shortened by `--override` (a few steps on tiny shards); it is the test of
issue 16's "sweeps isolated and complete": nothing two tasks share, nothing written outside the sweep folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_diffusion.cli import main
from lightning_diffusion.training.run_logs import find_runs, read_wandb_run
from slurm_cluster import REPO, TERMINAL, Cluster
from test_slurm_cluster import CLUSTER, write_shards

pytestmark = pytest.mark.slurm

MAX_STEPS = 16  # 2 epochs of 8 steps on 32 training images; SIGUSR1 after the first
SIGNALLED = 0  # the array task that gets SIGUSR1 while it trains
SWEEP_FILES = {"sweep.yaml", "tasks.jsonl", "submitted.json"}


def snapshot(folder: Path) -> dict[str, int]:
    """Every file below `folder` (none when it is missing) with its modification time."""
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


def submit_example(cluster: Cluster, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """`sweep configs/sweeps/example.yaml --submit` shortened by overrides, run in this process (it saves a python
    start) with the environment sbatch hands on to the jobs."""
    env = cluster.job_env()
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(REPO)
    overrides = {
        "trainer.max_steps": MAX_STEPS, "trainer.limit_val_batches": 1, "trainer.log_every_n_steps": 2,
        "trainer.accelerator": "cpu", "trainer.enable_progress_bar": False,
        "data.init_args.train_urls": f"{tmp}/train-*.tar", "data.init_args.val_urls": f"{tmp}/val-*.tar",
        "data.init_args.batch_size": 4, "data.init_args.val_batch_size": 4, "data.init_args.num_workers": 0,
    }
    args = ["sweep", "configs/sweeps/example.yaml", "--submit", "--out", str(tmp / "sweeps"),
            *(f"--override={k}={json.dumps(v)}" for k, v in overrides.items()),
            *(f"--sbatch={o}" for o in ("--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10"))]
    assert main(args) == 0
    (sweep_dir,) = (tmp / "sweeps").iterdir()
    return json.loads((sweep_dir / "submitted.json").read_text())["job_id"], sweep_dir


def signal_and_wait(cluster: Cluster, array_id: str, sweep_dir: Path) -> tuple[list[dict[str, str]], int]:
    """Send SIGUSR1 to task SIGNALLED in the middle of its run (after the first epoch wrote best.ckpt, before the
    first hpc checkpoint), wait for the whole array; return the records and the most tasks seen running at once."""
    run_dir = sweep_dir / "runs" / f"{CLUSTER}-{array_id}_{SIGNALLED}"
    deadline, most, sent_at = time.monotonic() + 600, 0, -1e9
    while time.monotonic() < deadline:
        records = cluster.jobs(array_id)
        most = max(most, sum(r["JobState"] == "RUNNING" for r in records))
        signalled = any(run_dir.glob("hpc_ckpt_*.ckpt"))
        task = next((r for r in records if r.get("ArrayTaskId") == str(SIGNALLED)), {})
        first_run = task.get("JobState") == "RUNNING" and task.get("Restarts") == "0"
        if not signalled and first_run and (run_dir / "checkpoints" / "best.ckpt").is_file() \
                and time.monotonic() - sent_at > 5:
            # Only the first run, and at most every 5 s: a signal that reaches the requeued run before it installs
            # its handler kills it (SIGUSR1's default action). "Can not be altered now" while the step starts or
            # ends: sent again after 5 s.
            cluster.run("scancel", "--signal=USR1", f"{array_id}_{SIGNALLED}", check=False)
            sent_at = time.monotonic()
        if len(records) == 6 and all(r["JobState"] in TERMINAL for r in records):
            assert signalled, f"task {SIGNALLED} ended before it was signalled: {records}"
            return records, most
        time.sleep(0.2)
    raise AssertionError(f"sweep {array_id} not finished: {cluster.jobs(array_id)}")


def test_example_sweep_isolated_and_complete_with_a_requeued_task(
    slurm_cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_shards(tmp_path, "train", shards=2)
    write_shards(tmp_path, "val", shards=1)
    repo_runs, repo_top = snapshot(REPO / "runs"), sorted(p.name for p in REPO.iterdir())
    array_id, sweep_dir = submit_example(slurm_cluster, tmp_path, monkeypatch)
    records, most_running = signal_and_wait(slurm_cluster, array_id, sweep_dir)
    logs = {i: (sweep_dir / f"slurm-{array_id}_{i}.out").read_text() for i in range(6)}
    by_task = {int(r["ArrayTaskId"]): r for r in records}
    assert sorted(by_task) == list(range(6)) and {r["ArrayTaskThrottle"] for r in records} == {"2"}
    failed = [i for i in range(6) if by_task[i]["JobState"] != "COMPLETED"]
    assert not failed, "\n".join(f"task {i}: {by_task[i]['JobState']} exit {by_task[i].get('ExitCode')} "
                                  f"restarts {by_task[i].get('Restarts')}\n{logs[i][-3000:]}" for i in failed)
    assert 1 <= most_running <= 2
    # the signalled task started twice, the others once (SLURM's Restarts counter itself was seen at 2 after one
    # requeue, when the killed first run's exit status arrived late: the launches are the ground truth)
    starts = [logs[i].count(f"[launch] job {array_id}_{i} restart ") for i in range(6)]
    assert starts == [2 if i == SIGNALLED else 1 for i in range(6)], starts
    assert [by_task[i]["Restarts"] == "0" for i in range(6)] == [i != SIGNALLED for i in range(6)]

    # nothing outside the sweep folder: the configs name no checkpoint folder, every path follows the run folder
    assert snapshot(REPO / "runs") == repo_runs and sorted(p.name for p in REPO.iterdir()) == repo_top
    top = {p.name for p in sweep_dir.iterdir()}
    assert top == SWEEP_FILES | {"runs"} | {f"slurm-{array_id}_{i}.out" for i in range(6)}, top

    tasks = [json.loads(line)["overrides"] for line in (sweep_dir / "tasks.jsonl").read_text().splitlines()]
    run_dirs = sorted((sweep_dir / "runs").iterdir())
    assert [d.name for d in run_dirs] == [f"{CLUSTER}-{array_id}_{i}" for i in range(6)]
    for i, (run_dir, task) in enumerate(zip(run_dirs, tasks)):
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (saved["model"]["init_args"]["lr"], saved["model"]["init_args"]["loss"]) == (
            task["model.init_args.lr"], task["model.init_args.loss"])
        assert Path(saved["trainer"]["default_root_dir"]) == run_dir and saved["trainer"]["max_steps"] == MAX_STEPS
        for name in ("last.ckpt", "best.ckpt"):
            assert (run_dir / "checkpoints" / name).is_file(), sorted(p.name for p in run_dir.rglob("*"))
        last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == MAX_STEPS and last["hyper_parameters"]["lr"] == task["model.init_args.lr"]
        hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
        offline = sorted((run_dir / "wandb").glob("offline-run-*"))
        assert all(r.name.endswith(f"-{run_dir.name}") for r in offline)  # the run id: stable across the requeue
        if i == SIGNALLED:
            (hpc_file,) = hpc
            hpc_step = torch.load(hpc_file, map_location="cpu", weights_only=True)["global_step"]
            assert 8 <= hpc_step < MAX_STEPS and len(offline) == 2, logs[i][-2000:]
            requeued = offline
            assert f"Restoring states from the checkpoint path at {hpc_file}" in logs[i]
        else:
            assert hpc == [] and len(offline) == 1

    runs = find_runs(sweep_dir)  # a requeued run's two offline folders merge into one run
    assert sorted(r.run_id for r in runs) == [d.name for d in run_dirs]
    assert {r.group for r in runs} == {sweep_dir.name}
    assert sorted(r.name for r in runs) == [f"task-{i}" for i in range(6)]
    steps = {r.name: [step for step, _ in r.history["train/loss"]] for r in runs}
    assert all(max(s) == MAX_STEPS - 1 for s in steps.values()), steps  # W&B's step of the last optimiser step
    # the second start continues the run from the hpc step (not from 0). What the first start logged reaches its
    # .wandb file only as far as wandb flushed it before SLURM killed the step on requeue (seen here: nothing).
    resumed = read_wandb_run(next(requeued[1].glob("run-*.wandb")))
    assert min(step for step, _ in resumed.history["train/loss"]) >= hpc_step - 1, resumed.history["train/loss"]

    capsys.readouterr()
    assert main(["compare", str(sweep_dir)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((sweep_dir / "compare" / "summary.json").read_text())
    assert set(summary["hparams"]) == {"model.init_args.lr", "model.init_args.loss"}, summary["hparams"]
    assert sorted(row["run"] for row in summary["runs"]) == [f"task-{i}" for i in range(6)]
    assert all(f"task-{i}" in printed for i in range(6)) and "train/loss final" in printed
    for row, lr, loss in zip(summary["runs"], summary["hparams"]["model.init_args.lr"],
                             summary["hparams"]["model.init_args.loss"]):
        task = tasks[int(row["run"].removeprefix("task-"))]
        assert (lr, loss) == (task["model.init_args.lr"], task["model.init_args.loss"])
        assert row["train/loss/final"] is not None
    plots = sorted(p.name for p in (sweep_dir / "compare").glob("*.png"))
    assert "curves_train_loss.png" in plots and "train_loss_vs_model.init_args.lr.png" in plots, plots
