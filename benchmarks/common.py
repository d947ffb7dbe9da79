"""What every ratio benchmark shares: the environment record, warm-up + median-of-repeats timing, the JSON result.

Each benchmark is a script (`python benchmarks/<name>.py [--quick]`) that measures two ways of doing the same
work, alternating them `--repeats` times, and writes `benchmarks/results/<name>.json` with the medians, every
run, the ratio, its target and whether it passed, and the machine, thread counts and library versions it ran
with. `--quick` uses tiny sizes for a smoke check and writes to `benchmarks/results/quick/` instead, so a smoke
run never overwrites a measurement.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
QUICK_RESULTS = RESULTS / "quick"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BASE_PACKAGES = ("torch", "lightning", "numpy")


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int = 3, device: bool = True) -> None:
    """--quick, --repeats, --threads, --out (and --device for model benchmarks)."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke check (results/quick/)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"alternating runs of each variant; the median is reported (default {repeats}, quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default results/<name>.json)")
    if device:
        parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    parser.set_defaults(default_repeats=repeats)


def finish_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick and apply --threads."""
    if args.repeats is None:
        args.repeats = 2 if args.quick else args.default_repeats
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock stamp counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(packages: Sequence[str] = (), device: torch.device | None = None) -> dict[str, Any]:
    """Machine (and GPU), thread counts and library versions: what a timing is only valid for."""
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    if device is not None:
        machine["device"] = str(device)
        if device.type == "cuda":
            machine["gpu"] = torch.cuda.get_device_name(device)
    return {
        "machine": machine,
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "versions": {"python": platform.python_version(),
                     **{name: version(name) for name in dict.fromkeys((*BASE_PACKAGES, *packages))},
                     "torch": torch.__version__, "cuda": torch.version.cuda},
    }


def alternate(runs: dict[str, Callable[[], float]], repeats: int, warmup: int = 0) -> dict[str, list[float]]:
    """Call each run `warmup` times untimed, then `repeats` rounds in turn; returns what each call measured.

    Alternating (A B A B ...) spreads slow phases of a shared machine over both; the median then drops outliers.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    measured: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            measured[name].append(run())
    return measured


def seconds(fn: Callable[[], Any], device: torch.device | None = None) -> float:
    """Wall-clock seconds of one call (GPU work included)."""
    if device is not None:
        synchronize(device)
    start = time.perf_counter()
    fn()
    if device is not None:
        synchronize(device)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class StepClock:
    """Wall-clock stamps after each training step; steady seconds/step leave out the first `warmup` steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def stamp(self) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def seconds_per_step(self, warmup: int) -> float:
        if not 1 <= warmup < len(self.stamps):
            raise ValueError(f"need more than {warmup} steps (got {len(self.stamps)}) and warmup >= 1")
        return (self.stamps[-1] - self.stamps[warmup - 1]) / (len(self.stamps) - warmup)


def clock_callback(clock: StepClock) -> Any:
    """A Lightning callback stamping `clock` after every training batch (optimiser step included)."""
    from lightning.pytorch.callbacks import Callback

    class _Clock(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            clock.stamp()

    return _Clock()


def meets(ratio: float, target: str) -> bool:
    """`target` is '<= x' or '>= x'."""
    op, value = target.split()
    return ratio <= float(value) if op == "<=" else ratio >= float(value)


def portable_argument(argument: str) -> str:
    """An absolute path into a checkout's `runs/` or `data/` as the relative path a user copies from the README
    (`/tmp/clone/runs/quickstart/...` -> `runs/quickstart/...`); anything else unchanged."""
    match = re.match(r"^/\S*?/((?:runs|data)/\S*)$", argument)
    return match.group(1) if match else argument


def write_result(name: str, args: argparse.Namespace, result: dict[str, Any], *, ratio: float, target: str,
                 ratio_definition: str, packages: Sequence[str] = (), device: torch.device | None = None,
                 summary: Sequence[str] = ()) -> Path:
    """Write `results/<name>.json` (or `results/quick/`, or --out) and print a one-line summary."""
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS) / f"{name}.json"
    argv = [portable_argument(arg) for arg in sys.argv[1:]]
    record = {"benchmark": name, "command": " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *argv]),
              "quick": bool(args.quick), "repeats": args.repeats, **result,
              "ratio": round(ratio, 3), "ratio_definition": ratio_definition, "target": target,
              "passed": meets(ratio, target), **environment(packages, device)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    shown = {key: record[key] for key in (*summary, "ratio", "target", "passed")}
    print(json.dumps({"benchmark": name, **shown}))
    return out


def synthetic_shards(directory: Path, count: int, size: int = 64) -> str:
    """Shards of real PNG bytes of smooth random `size`-px images with captions, for machines without the emoji data."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(directory / "train-%06d.tar"), maxcount=500, verbose=0) as writer:
        for index in range(count):
            base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            writer.write({"__key__": f"synthetic{index:06d}", "png": buffer.getvalue(),
                          "txt": f"synthetic image {index}"})
    return str(directory / "train-*.tar")
