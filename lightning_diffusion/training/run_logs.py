"""Read finished or running local runs: offline W&B runs and Lightning CSV logs, into one `RunLog` shape.

wandb 0.31 writes an offline run as `offline-run-<time>-<id>/run-<id>.wandb`: a LevelDB-style log (7-byte file
header `:W&B` + magic + version, then 32 KiB blocks of records, each `crc32 | length | type` + a protobuf
`wandb.proto.wandb_internal_pb2.Record`). wandb no longer ships a reader for it, so `wandb_records` below is a
short one; the records themselves are parsed with wandb's own protobuf classes. A resumed run writes a second
folder with the same id; `find_runs` merges them.
"""

from __future__ import annotations

import csv
import json
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_diffusion.errors import UserError

_FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version
_RECORD_HEADER = struct.Struct("<IHB")  # crc32(type + payload), payload length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_SKIP_KEYS = ("_wandb",)


@dataclass
class RunLog:
    """One run: where it is, its name/group, flattened config (`a.b.c` keys) and scalar history per metric."""

    path: Path
    name: str
    run_id: str
    kind: str  # "wandb" or "csv"
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)  # image keys logged (W&B)
    finished: bool = True  # W&B: the run's exit record is written (False while running, or after a crash)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{'a': {'b': 1}} -> {'a.b': 1}`; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def wandb_records(path: Path) -> Iterator[Any]:
    """Yield the protobuf `Record`s of a `.wandb` file; a torn tail (killed job) or a bad checksum ends the scan."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if len(data) < _FILE_HEADER.size or _FILE_HEADER.unpack_from(data)[0] != b":W&B":
        raise ValueError(f"{path} is not a W&B run log")
    pos, pending = _FILE_HEADER.size, b""
    while pos + _RECORD_HEADER.size <= len(data):
        space = _BLOCK - pos % _BLOCK
        if space < _RECORD_HEADER.size:  # block trailer padding
            pos += space
            continue
        crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        payload = data[pos + _RECORD_HEADER.size: pos + _RECORD_HEADER.size + length]
        if kind == 0 and length == 0:
            pos += space
            continue
        if len(payload) < length or zlib.crc32(bytes([kind]) + payload) != crc:
            return
        pos += _RECORD_HEADER.size + length
        if kind == _FIRST:
            pending = payload
            continue
        if kind == _MIDDLE:
            pending += payload
            continue
        chunk = pending + payload if kind == _LAST else payload
        pending = b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        yield record


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _config_items(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key = _item_key(item)
        if key in _SKIP_KEYS:
            continue
        value = json.loads(item.value_json)
        out.update(flatten({key: value}))
    return out


def read_wandb_run(run_file: Path, run: RunLog | None = None) -> RunLog:
    """Read one `run-<id>.wandb` into `run` (or a new `RunLog`): config, group, name, scalar history."""
    run = run or RunLog(path=run_file.parent, name=run_file.stem, run_id=run_file.stem.removeprefix("run-"),
                        kind="wandb")
    finished = False
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id or run.run_id
            run.name = record.run.display_name or run.name
            run.group = record.run.run_group or run.group
            run.tags = list(record.run.tags) or run.tags
            run.config.update(_config_items(record.run.config.update))
        elif kind == "exit":
            finished = True
        elif kind == "config":
            run.config.update(_config_items(record.config.update))
        elif kind == "history":
            row = {_item_key(item): json.loads(item.value_json) for item in record.history.item}
            step = row.get("trainer/global_step", row.get("_step", 0))
            media = {key.removesuffix("/_type") for key, value in row.items()
                     if key.endswith("/_type") and str(value).startswith("image")}
            run.images += sorted(media - set(run.images))
            for key, value in row.items():
                if key.startswith("_") or key in ("trainer/global_step", "epoch") or isinstance(value, bool):
                    continue
                if any(key.startswith(f"{prefix}/") for prefix in media):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    run.history.setdefault(key, []).append((int(step), float(value)))
    run.finished = finished  # of the latest folder, for a run resumed in several
    return run


def read_csv_run(metrics_csv: Path) -> RunLog:
    """Read Lightning's `metrics.csv` plus `hparams.yaml` and the CLI's `config.yaml` (same or parent folder)."""
    folder = metrics_csv.parent
    run = RunLog(path=folder, name=f"{folder.parent.name}/{folder.name}", run_id=folder.name, kind="csv")
    for candidate in (folder.parent.parent / "config.yaml", folder.parent / "config.yaml",
                      folder / "config.yaml", folder / "hparams.yaml"):
        if candidate.is_file():
            try:
                loaded = yaml.safe_load(candidate.read_text()) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                raise UserError(f"'{candidate}' is not plain YAML ({str(err).strip().splitlines()[0]}): fix or "
                                "remove it, or leave that run out") from err
            if isinstance(loaded, dict):
                run.config.update(flatten(loaded))
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for key, text in row.items():
                if key in ("step", "epoch") or not text:
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                if math.isfinite(value):
                    run.history.setdefault(key, []).append((step, value))
    run.group = next((str(v) for k, v in run.config.items() if k.endswith("logger.init_args.group") and v), None)
    return run


def find_runs(root: Path) -> list[RunLog]:
    """All runs under `root` (or `root` itself): W&B offline runs (merged by id across resumes), then CSV logs."""
    root = Path(root)
    wandb_runs: dict[str, RunLog] = {}
    for run_file in sorted(root.rglob("run-*.wandb"), key=lambda p: p.parent.name):
        run_id = run_file.stem.removeprefix("run-")
        wandb_runs[run_id] = read_wandb_run(run_file, wandb_runs.get(run_id))
    csv_runs = [read_csv_run(path) for path in sorted(root.rglob("metrics.csv"))]
    for run in wandb_runs.values():
        for values in run.history.values():
            values.sort(key=lambda pair: pair[0])
    return [*wandb_runs.values(), *csv_runs]
