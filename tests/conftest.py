"""Test-wide settings: offline, deterministic, small."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

# Tests run tiny models one after another: one thread avoids oversubscription (DDP tests start two processes).
torch.set_num_threads(1)

import pytest  # noqa: E402

_DISTRIBUTED_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    """Lightning writes MASTER_ADDR/MASTER_PORT into os.environ; a value left by one test (e.g. a simulated SLURM
    node name) would make a later DDP test wait forever for that address."""
    saved = {name: os.environ.get(name) for name in _DISTRIBUTED_VARS}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
