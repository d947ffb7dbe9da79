"""The sbatch templates on a real (local) SLURM cluster of two nodes on this host (the sweep: test_sweep_cluster.py).

A tiny model (tests/slurm/tiny_model.py, config tests/slurm/tiny.yaml) trains with DDP over 2 CPU processes
(gloo), launched exactly as on a GPU cluster: `sbatch slurm/*.sbatch`, `srun`, Lightning's SLURMEnvironment.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from slurm_cluster import Cluster

pytestmark = pytest.mark.slurm

MAX_STEPS = 800  # ~10 s of training here: long enough to signal a run mid-way
SIGNAL_AT = 100
CLUSTER = "localcluster"  # ClusterName in slurm/local/start.sh's slurm.conf
ONE_NODE_2_TASKS = ["--gpus-per-node=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]


def markers(text: str) -> list[str]:
    return [line.split(" ", 3)[3] for line in text.splitlines() if line.startswith("[marker] ")]


def marker_values(text: str, prefix: str) -> list[dict[str, str]]:
    return [dict(re.findall(r"(\w+)=(\S*)", m)) for m in markers(text) if m.startswith(prefix)]


def global_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


@dataclass
class FitJob:
    job_id: str
    record: dict[str, str]
    log: str
    run_dir: Path


def submit_fit(cluster: Cluster, tmp: Path, signal_at: int | None = None) -> FitJob:
    """`sbatch slurm/fit.sbatch` with the tiny config; with `signal_at`, `scancel --signal=USR1` at that step."""
    output = tmp / "fit-%j.out"
    env = cluster.job_env(CONFIG="tests/slurm/tiny.yaml", RUNS=str(tmp / "runs"))
    job_id = cluster.sbatch(*ONE_NODE_2_TASKS, f"--output={output}", "slurm/fit.sbatch",
                            "--trainer.max_steps", str(MAX_STEPS), env=env)
    log_path = tmp / f"fit-{job_id}.out"
    if signal_at is not None:
        deadline = time.monotonic() + 120
        while not (log_path.exists() and f"step={signal_at}\n" in log_path.read_text()):
            assert time.monotonic() < deadline, f"job {job_id} never reached step {signal_at}"
            assert cluster.jobs(job_id)[0]["JobState"] in ("PENDING", "RUNNING"), cluster.jobs(job_id)
            time.sleep(0.1)
        cluster.run("scancel", "--signal=USR1", job_id)
    (record,) = cluster.wait(job_id, timeout=240, output=log_path)
    return FitJob(job_id, record, log_path.read_text(), tmp / "runs" / f"{CLUSTER}-{job_id}")


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> FitJob:
    return submit_fit(slurm_cluster, tmp_path_factory.mktemp("fit"))


def test_fit_sbatch_trains_with_ddp_and_checkpoints(uninterrupted: FitJob) -> None:
    job = uninterrupted
    assert job.record["JobState"] == "COMPLETED", job.log[-3000:]
    assert job.record["Restarts"] == "0"
    ranks = marker_values(job.log, "rank=")
    assert sorted(r["rank"] for r in ranks) == ["0", "1"]
    assert {r["world"] for r in ranks} == {"2"} and {r["node"] for r in ranks} == {"0"}
    (start,) = marker_values(job.log, "start ")
    assert start["step"] == "0" and start["run_id"] == job.run_dir.name
    assert global_step(job.run_dir / "checkpoints" / "last.ckpt") == MAX_STEPS
    saved = yaml.safe_load((job.run_dir / "config.yaml").read_text())["trainer"]
    assert (str(saved["devices"]), saved["num_nodes"]) == ("2", 1)  # devices: int | str | list, "2" = 2 devices
    assert Path(saved["default_root_dir"]) == job.run_dir
    (wandb_run,) = (job.run_dir / "wandb").glob("offline-run-*")
    assert wandb_run.name.endswith(f"-{job.run_dir.name}")


def test_usr1_checkpoints_requeues_and_resumes_same_run(slurm_cluster: Cluster, tmp_path: Path,
                                                        uninterrupted: FitJob) -> None:
    job = submit_fit(slurm_cluster, tmp_path, signal_at=SIGNAL_AT)
    assert job.record["JobState"] == "COMPLETED", job.log[-3000:]
    assert job.record["Restarts"] == "1", job.log[-3000:]
    assert f"requeued SLURM job {job.job_id}" in job.log

    (hpc,) = job.run_dir.glob("hpc_ckpt_*.ckpt")
    saved_step = global_step(hpc)
    assert job.log.count(f"SIGUSR1 received: saving {hpc} at step {saved_step}") == 2  # both ranks, same step
    assert SIGNAL_AT <= saved_step < MAX_STEPS
    first, second = marker_values(job.log, "start ")
    assert (first["step"], second["step"]) == ("0", str(saved_step)), "the requeued run did not resume"
    assert first["run_id"] == second["run_id"] == job.run_dir.name
    assert f"Restoring states from the checkpoint path at {hpc}" in job.log
    wandb_runs = sorted((job.run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(r.name.endswith(f"-{job.run_dir.name}") for r in wandb_runs)

    final = global_step(job.run_dir / "checkpoints" / "last.ckpt")
    assert final == global_step(uninterrupted.run_dir / "checkpoints" / "last.ckpt") == MAX_STEPS


def test_multinode_sbatch_spans_two_nodes(slurm_cluster: Cluster, tmp_path: Path) -> None:
    """2 nodes x 1 task (two slurmd on this host): ranks and node ranks from SLURM, rendezvous on node 1."""
    env = slurm_cluster.job_env(CONFIG="tests/slurm/tiny.yaml", RUNS=str(tmp_path / "runs"))
    job_id = slurm_cluster.sbatch("--nodes=2", "--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=1",
                                  "--mem=1000", "--time=10", f"--output={tmp_path}/mn-%j.out", "slurm/multinode.sbatch",
                                  "--trainer.max_steps", "40", env=env)
    log_path = tmp_path / f"mn-{job_id}.out"
    (record,) = slurm_cluster.wait(job_id, timeout=240, output=log_path)
    log = log_path.read_text()
    assert record["JobState"] == "COMPLETED" and record["NodeList"] == "node[1-2]", log[-3000:]
    assert "2 node(s) x 1 task(s), rendezvous 127.0.0.1:" in log  # node1's NodeAddr
    ranks = sorted((r["rank"], r["node"], r["local_rank"], r["world"]) for r in marker_values(log, "rank="))
    assert ranks == [("0", "0", "0", "2"), ("1", "1", "0", "2")]
    run_dir = tmp_path / "runs" / f"{CLUSTER}-{job_id}"
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 40
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["num_nodes"] == 2


def write_shards(folder: Path, split: str, shards: int, per_shard: int = 16) -> None:
    """Tiny image-caption shards (32 px PNG + caption) in the project's format."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(len(split))
    with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(shards * per_shard):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="png")
            sink.write({"__key__": f"{split}{i:05d}", "png": buffer.getvalue(), "txt": f"a pattern of kind {i % 5}"})


def test_fit_sbatch_trains_the_clip_stage(slurm_cluster: Cluster, tmp_path: Path) -> None:
    """The real CLIP stage config (contrastive loss gathered over 2 ranks) on shards, launched by fit.sbatch."""
    write_shards(tmp_path, "train", shards=2)
    write_shards(tmp_path, "val", shards=1)
    overrides = tmp_path / "slurm_test.yaml"  # the CPU-minutes config made seconds: 2 epochs of 4 steps per rank
    overrides.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 8, "max_epochs": None, "limit_val_batches": 2, "accelerator": "cpu",
                    "strategy": "ddp", "enable_progress_bar": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True}}]},
        "data": {"init_args": {"train_urls": f"{tmp_path}/train-*.tar", "val_urls": f"{tmp_path}/val-*.tar",
                               "batch_size": 4, "val_batch_size": 4, "num_workers": 0}}}))
    env = slurm_cluster.job_env(CONFIG=f"configs/clip/tiny.yaml {overrides}", RUNS=str(tmp_path / "runs"))
    job_id = slurm_cluster.sbatch(*ONE_NODE_2_TASKS, f"--output={tmp_path}/clip-%j.out", "slurm/fit.sbatch", env=env)
    log_path = tmp_path / f"clip-{job_id}.out"
    (record,) = slurm_cluster.wait(job_id, timeout=240, output=log_path)
    log = log_path.read_text()
    assert record["JobState"] == "COMPLETED", log[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    run_dir = tmp_path / "runs" / f"{CLUSTER}-{job_id}"
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 8
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "lightning_diffusion.clip.CLIPModule"
