"""Samples/s of ShardDataModule's train loader against a raw PIL loop doing the same decode + resize + batch.

The raw loop is the floor a data pipeline cannot beat: the same image bytes, already in memory, decoded with PIL,
converted to RGB, resized (shorter side, antialiased bicubic) and centre-cropped, stacked into a float batch in
[-1, 1] by a plain map-style DataLoader with the same worker count and batch size. The DataModule additionally
streams the tars, shuffles, splits, checks and counts. Target: ratio >= 0.9. Both are timed from iter() (worker
start-up included) over the same number of samples, alternating, median of `--repeats`;
CPU time per sample (this process and its workers) is reported too, as it does not swing with other load.

    python benchmarks/data_throughput.py --shards 'data/emoji/train-*.tar' --image-size 32 --workers 2
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines import ShardDataModule  # noqa: E402
from data_pipelines.decoding import resize_center_crop  # noqa: E402
from data_pipelines.urls import resolve_shards  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "data_throughput.json"


class RawImages(Dataset):
    """In-memory image bytes -> uint8 [size, size, 3] with PIL: the baseline."""

    def __init__(self, images: list[bytes], size: int) -> None:
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(io.BytesIO(self.images[index])) as image:
            return torch.from_numpy(np.array(resize_center_crop(image.convert("RGB"), self.size)))


def raw_collate(images: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def read_image_bytes(urls: list[str], limit: int) -> list[bytes]:
    import webdataset as wds

    images = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        images.append(next(sample[key] for key in ("png", "jpg", "jpeg", "webp") if key in sample))
        if len(images) >= limit:
            break
    return images


def synthetic_shards(directory: Path, count: int, size: int = 64) -> str:
    """Real PNG bytes of smooth random `size`-px images, for machines without the emoji shards."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(directory / "train-%06d.tar"), maxcount=500, verbose=0) as writer:
        for index in range(count):
            base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            writer.write({"__key__": f"synthetic{index:06d}", "png": buffer.getvalue(), "txt": f"synthetic image {index}"})
    return str(directory / "train-*.tar")


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(loader, samples: int) -> tuple[float, float]:
    """(samples/s wall clock, CPU ms per sample over this process and its finished workers) for `samples` samples.

    Wall-clock rates swing with other load on a shared machine; CPU time per sample does not, so both are kept.
    """
    seen, cpu, start = 0, _cpu_seconds(), time.perf_counter()
    while seen < samples:
        iterator = iter(loader)
        for batch in iterator:
            seen += (batch["image"] if isinstance(batch, dict) else batch).shape[0]
            if seen >= samples:
                break
        elapsed = time.perf_counter() - start
        del iterator  # joins the (non-persistent) workers, so their CPU time is counted
        gc.collect()
    return seen / elapsed, (_cpu_seconds() - cpu) * 1000 / seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default=None, help="shard pattern (default: synthetic 64 px PNG shards in a temp dir)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4000, help="samples timed per run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the median is reported")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as scratch:
        pattern = args.shards or synthetic_shards(Path(scratch), args.samples)
        urls = resolve_shards(pattern, "--shards")
        images = read_image_bytes(urls, args.samples)
        dm = ShardDataModule(pattern, image_size=args.image_size, batch_size=args.batch_size, num_workers=args.workers,
                             persistent_workers=False, pin_memory=False)
        train = dm.train_dataloader()
        raw = DataLoader(RawImages(images, args.image_size), batch_size=args.batch_size, shuffle=True,
                         num_workers=args.workers, collate_fn=raw_collate, drop_last=True)
        samples = min(args.samples, len(images), len(train) * args.batch_size)
        runs: dict[str, list[tuple[float, float]]] = {"raw_pil": [], "datamodule": []}
        for _ in range(args.repeats):
            runs["raw_pil"].append(timed(raw, samples))
            runs["datamodule"].append(timed(train, samples))

    result = {
        "benchmark": "data_throughput",
        "command": "python benchmarks/data_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shards": pattern if args.shards else f"synthetic: {len(urls)} shards of 64 px PNG",
        "num_shards": len(urls), "image_size": args.image_size, "batch_size": args.batch_size,
        "workers": args.workers, "samples_timed": samples, "repeats": args.repeats,
        "raw_pil_samples_per_s": round(statistics.median(r for r, _ in runs["raw_pil"]), 1),
        "datamodule_samples_per_s": round(statistics.median(r for r, _ in runs["datamodule"]), 1),
        "raw_pil_cpu_ms_per_sample": round(statistics.median(c for _, c in runs["raw_pil"]), 4),
        "datamodule_cpu_ms_per_sample": round(statistics.median(c for _, c in runs["datamodule"]), 4),
        "all_runs_samples_per_s": {name: [round(r, 1) for r, _ in values] for name, values in runs.items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)},
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "pillow": Image.__version__,
                     "numpy": np.__version__, "webdataset": __import__("webdataset").__version__,
                     "lightning": __import__("lightning").__version__},
    }
    result["ratio"] = round(result["datamodule_samples_per_s"] / result["raw_pil_samples_per_s"], 3)
    result["cpu_ratio"] = round(result["raw_pil_cpu_ms_per_sample"] / result["datamodule_cpu_ms_per_sample"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("raw_pil_samples_per_s", "datamodule_samples_per_s", "ratio", "cpu_ratio", "all_runs_samples_per_s")
    print(json.dumps({key: result[key] for key in keys}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
