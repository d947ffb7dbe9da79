"""Client side of the local test cluster: submit, inspect, signal and wait for jobs (used by tests/slurm/)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def free_port(consecutive: int = 1) -> int:
    """A port p with p .. p + consecutive - 1 all free now (one slurmd per node takes consecutive ports)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + consecutive <= 65535 and all(_is_free(port + i) for i in range(1, consecutive)):
            return port
    raise RuntimeError(f"no {consecutive} consecutive free ports")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Cluster:
    """Client side of the test cluster: submit, inspect, signal and wait for jobs."""

    root: Path
    env: dict[str, str]

    def job_env(self, **extra: str) -> dict[str, str]:
        """The environment sbatch passes to jobs: this python on PATH, test model importable, W&B offline."""
        env = {k: v for k, v in self.env.items() if not k.startswith(("SLURM_", "MASTER_", "WANDB_"))}
        env.update(SLURM_CONF=self.env["SLURM_CONF"], WANDB_MODE="offline", WANDB_SILENT="true",
                   PYTHONPATH=str(REPO / "tests" / "slurm"), ACTIVATE=f"export PATH={Path(sys.executable).parent}:$PATH",
                   XDG_CACHE_HOME=str(self.root / "cache"), PYTHONWARNINGS="ignore")
        env.update(extra)
        return env

    def run(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=REPO, env=env or self.env, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, *args: str, env: dict[str, str]) -> str:
        return self.run("sbatch", "--parsable", *args, env=env).stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` records (one per array task; pending array tasks may share one record)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float, output: Path | None = None) -> list[dict[str, str]]:
        """Poll until every record of `job_id` is in a terminal state; fail with the job's log on time-out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            if records and all(r["JobState"] in TERMINAL for r in records):
                return records
            time.sleep(0.5)
        tail = output.read_text()[-3000:] if output and output.exists() else ""
        raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s: {self.jobs(job_id)}\n{tail}")
