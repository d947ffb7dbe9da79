"""A real single-node SLURM cluster for the `slurm` tests: installed when missing, started once, stopped by PID.

`slurm/local/start.sh` installs Debian's slurm-wlm and munge when `slurmctld` is missing (needs root and the
Debian registry, as in CI), writes a private slurm.conf for two nodes with two fake GPUs each, starts
munged, slurmctld and one slurmd per node (all on this host) on free ports under a temporary folder, and records their PIDs; `slurm/local/stop.sh` cancels the jobs
and stops exactly those PIDs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_cluster import REPO, Cluster, free_port


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurmd); CI runs as root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("slurmctld missing and no apt-get to install slurm-wlm")
    root = Path(tempfile.mkdtemp(prefix="ld-slurm-", dir="/tmp"))  # short: the munge socket path is limited
    root.chmod(0o755)  # munged runs as user munge and must reach its socket folder
    env = {**os.environ, "SLURM_LOCAL_ROOT": str(root), "SLURM_LOCAL_GPUS": "2", "SLURM_LOCAL_NODES": "2",
           "SLURM_LOCAL_CTLD_PORT": str(free_port()), "SLURM_LOCAL_SLURMD_PORT": str(free_port(consecutive=2))}
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_PROC"))}
    start = subprocess.run([str(REPO / "slurm/local/start.sh")], env=env, capture_output=True, text=True, timeout=900)
    if start.returncode != 0:
        subprocess.run([str(REPO / "slurm/local/stop.sh")], env=env, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"local SLURM cluster did not start:\n{start.stderr[-3000:]}")
    env["SLURM_CONF"] = str(root / "etc" / "slurm.conf")
    try:
        yield Cluster(root=root, env=env)
    finally:
        subprocess.run([str(REPO / "slurm/local/stop.sh")], env=env, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
