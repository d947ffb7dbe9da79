"""Layout rules that nothing else would catch: the data pipeline imports no model code, and no config pins a
checkpoint folder (a run's files follow its `trainer.default_root_dir`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL_PACKAGES = ("autoencoder", "clip", "diffusion", "classifier", "text_encoders", "pretrained", "metrics", "commands")


def test_data_pipelines_import_no_model_code() -> None:
    modules = sorted(p.stem for p in (REPO / "data_pipelines").glob("*.py") if p.stem not in ("__main__",))
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module('data_pipelines.' + name if name != '__init__' "
            "else 'data_pipelines')\n"
            "print('\\n'.join(m for m in sys.modules if m.startswith('lightning_diffusion')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    models = [m for m in loaded.stdout.split() if m.split(".")[1:2] and m.split(".")[1] in MODEL_PACKAGES]
    assert models == [], models


def _dirpaths(node: object) -> list[str]:
    if isinstance(node, dict):
        return [str(v) for k, v in node.items() if k == "dirpath"] + [d for v in node.values() for d in _dirpaths(v)]
    if isinstance(node, list):
        return [d for v in node for d in _dirpaths(v)]
    return []


def test_no_config_pins_a_checkpoint_folder() -> None:
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(configs) > 20
    pinned = {str(p.relative_to(REPO)): _dirpaths(yaml.safe_load(p.read_text())) for p in configs}
    assert {name: dirs for name, dirs in pinned.items() if dirs} == {}
