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
