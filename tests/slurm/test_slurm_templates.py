"""Fast checks of the SLURM pieces without a cluster: template syntax, the resume/override helpers, the
save-and-requeue callback in one process, and the rank contract of Lightning's SLURMEnvironment for 2 nodes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from lightning_diffusion.errors import UserError
from lightning_diffusion.training.slurm_job import main as slurm_job_main
from lightning_diffusion.training.slurm_job import override_args, resume_checkpoint, task_overrides
from lightning_diffusion.training.slurm_requeue import RequeueOnSignal
from slurm_cluster import REPO
from tiny_model import PatternData, TinyAutoencoder

SCRIPTS = sorted([*(REPO / "slurm").glob("*.sbatch"), REPO / "slurm/launch.sh", *(REPO / "slurm/local").glob("*.sh")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_scripts_parse(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["fit", "multinode", "sweep"])
def test_templates_request_what_lightning_needs(name: str) -> None:
    text = (REPO / f"slurm/{name}.sbatch").read_text()
    for directive in ("--ntasks-per-node=", "--gpus-per-node=", "--signal=SIGUSR1@90", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {directive}" in text, directive
    assert 'source "${SLURM_SUBMIT_DIR' in text
    launch = (REPO / "slurm/launch.sh").read_text()
    assert "srun --kill-on-bad-exit=1 bash -c 'trap \"\" USR1; exec \"$@\"' usr1-ignored python -m lightning_diffusion fit" in launch


def _touch(path: Path, mtime: float, step: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_resume_prefers_lightning_hpc_restore_unless_last_is_newer(tmp_path: Path) -> None:
    assert resume_checkpoint(tmp_path / "missing") is None
    assert resume_checkpoint(tmp_path) is None
    now = time.time()
    _touch(tmp_path / "hpc_ckpt_1.ckpt", now - 100, step=9)
    assert resume_checkpoint(tmp_path) is None  # Lightning restores hpc checkpoints itself
    last = _touch(tmp_path / "proj" / "run" / "checkpoints" / "last.ckpt", now - 90, step=9)
    assert resume_checkpoint(tmp_path) is None  # written on the way out after the requeue: the hpc state
    last = _touch(last, now - 50, step=40)
    assert resume_checkpoint(tmp_path) == last  # trained on after the requeue, then the job crashed
    _touch(tmp_path / "hpc_ckpt_2.ckpt", now, step=41)
    assert resume_checkpoint(tmp_path) is None


def test_resume_args_and_task_args_are_nul_separated(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    last = _touch(tmp_path / "run" / "last.ckpt", time.time())
    assert slurm_job_main(["resume-args", str(tmp_path / "run")]) == 0
    assert capfd.readouterr().out == f"--ckpt_path\0{last}\0"
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"index": 0, "overrides": {"model.init_args.lr": 0.001, "trainer.strategy": "auto"}}\n'
                     '{"index": 1, "overrides": {"model.init_args.betas": [0.9, 0.99], "trainer.fast": true}}\n')
    assert slurm_job_main(["task-args", str(tasks), "1"]) == 0
    assert capfd.readouterr().out.split("\0")[:-1] == ["--model.init_args.betas=[0.9, 0.99]", "--trainer.fast=true"]
    assert override_args({"a.b": 0.0003, "c": "x y"}) == ["--a.b=0.0003", "--c=x y"]
    with pytest.raises(UserError, match="array task 2 has no line"):
        task_overrides(tasks, 2)
    assert slurm_job_main(["task-args", str(tmp_path / "nope.jsonl"), "0"]) == 2


SLURM_VARS = ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_PROCID",
              "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NODELIST",
              "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "MASTER_ADDR", "MASTER_PORT")


def _slurm_env(monkeypatch: pytest.MonkeyPatch, rank: int, nodes: int, per_node: int, **extra: str) -> None:
    for var in SLURM_VARS:
        # set, then delete: monkeypatch then removes the variable again at teardown even when it was unset, so
        # what Lightning's SLURMEnvironment writes into os.environ (MASTER_ADDR/PORT) cannot leak into later tests
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    values = {"SLURM_NTASKS": nodes * per_node, "SLURM_NTASKS_PER_NODE": per_node, "SLURM_NNODES": nodes,
              "SLURM_JOB_NUM_NODES": nodes, "SLURM_PROCID": rank, "SLURM_LOCALID": rank % per_node,
              "SLURM_NODEID": rank // per_node, "SLURM_JOB_ID": 123456, "SLURM_JOB_NAME": "ld-multinode",
              "SLURM_NODELIST": "gpu[07-08]", **extra}
    for var, value in values.items():
        monkeypatch.setenv(var, str(value))


@pytest.mark.parametrize("rank", range(4))
def test_two_node_rank_contract(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    """What multinode.sbatch gives each of 4 processes (2 nodes x 2 tasks) and what Lightning makes of it."""
    _slurm_env(monkeypatch, rank, nodes=2, per_node=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue
    assert (trainer.world_size, trainer.global_rank, trainer.node_rank, trainer.local_rank) == (
        4, rank, rank // 2, rank % 2)
    assert env.main_address == "gpu07"  # first node of the allocation
    assert env.main_port == 15000 + 3456  # Lightning's port from the job id when MASTER_PORT is not set
    # launch.sh exports the address from `scontrol show hostnames` and a port from the job id: they win
    monkeypatch.setenv("MASTER_ADDR", "gpu07.cluster")
    monkeypatch.setenv("MASTER_PORT", str(15000 + 123456 % 20000))
    assert (env.main_address, env.main_port) == ("gpu07.cluster", 18456)


def test_two_node_settings_must_match_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why launch.sh passes devices/num_nodes from SLURM's variables: Lightning's launcher checks them at fit."""
    _slurm_env(monkeypatch, 0, nodes=2, per_node=2)
    env = SLURMEnvironment()
    env.validate_settings(num_devices=2, num_nodes=2)
    with pytest.raises(ValueError, match="num_nodes"):
        env.validate_settings(num_devices=2, num_nodes=1)
    with pytest.raises(ValueError, match="devices"):
        env.validate_settings(num_devices=1, num_nodes=2)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")  # `--ntasks=4` without --ntasks-per-node
    with pytest.raises(RuntimeError, match="ntasks-per-node"):
        SLURMEnvironment()


class SignalAtStep(L.Callback):
    """Sends the job's warning signal to this process in the middle of training."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_requeue_callback_saves_hpc_checkpoint_and_requeues(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _slurm_env(monkeypatch, 0, nodes=1, per_node=1, SLURM_ARRAY_JOB_ID=77, SLURM_ARRAY_TASK_ID=3)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"  # records the call instead of requeueing
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    before = signal.getsignal(signal.SIGUSR1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=50, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[RequeueOnSignal(), SignalAtStep(5)])
    trainer.fit(TinyAutoencoder(channels=4), PatternData(size=16, batch_size=4))
    (hpc,) = tmp_path.glob("hpc_ckpt_*.ckpt")
    assert hpc.name == "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, map_location="cpu", weights_only=True)["global_step"] == trainer.global_step == 6
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 77_3\n"
    if before not in (signal.SIG_DFL, None):
        assert signal.getsignal(signal.SIGUSR1) is before  # a handler of the process' own is restored after fit
    else:  # the default would kill the process: a warning after the last step (W&B still syncing) is only logged
        os.kill(os.getpid(), signal.SIGUSR1)
        assert (tmp_path / "scontrol.calls").read_text() == "requeue 77_3\n"
        signal.signal(signal.SIGUSR1, before)
