"""Samples/s of ShardDataModule's train loader against a raw PIL loop doing the same decode + resize + batch.

The raw loop is the floor a data pipeline cannot beat: the same image bytes, already in memory, decoded with PIL,
converted to RGB, resized (shorter side, antialiased bicubic) and centre-cropped, stacked into a float batch in
[-1, 1] by a plain map-style DataLoader with the same worker count and batch size. The DataModule additionally
streams the tars, shuffles, splits, checks and counts. Target: ratio >= 0.9. Both are timed from iter() (worker
start-up included) over the same number of samples, alternating, median of `--repeats`;
CPU time per sample (this process and its workers) is reported too, as it does not swing with other load.

    python benchmarks/data_throughput.py --shards 'data/emoji/train-*.tar' --image-size 32 --workers 2
    python benchmarks/data_throughput.py --quick   # 256 synthetic samples, a smoke check
"""

from __future__ import annotations

import argparse
import gc
import io
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common import add_common_arguments, finish_arguments, synthetic_shards, write_result

from data_pipelines import ShardDataModule
from data_pipelines.decoding import resize_center_crop
from data_pipelines.urls import resolve_shards


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
    parser.add_argument("--shards", default=None,
                        help="shard pattern (default: synthetic 64 px PNG shards in a temp dir)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=None, help="samples timed per run (default 4000, quick 256)")
    add_common_arguments(parser, repeats=3, device=False)
    args = finish_arguments(parser.parse_args(argv))
    if args.samples is None:
        args.samples = 256 if args.quick else 4000

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
        "shards": pattern if args.shards else f"synthetic: {len(urls)} shards of 64 px PNG",
        "num_shards": len(urls), "image_size": args.image_size, "batch_size": args.batch_size,
        "workers": args.workers, "samples_timed": samples,
        "raw_pil_samples_per_s": round(statistics.median(r for r, _ in runs["raw_pil"]), 1),
        "datamodule_samples_per_s": round(statistics.median(r for r, _ in runs["datamodule"]), 1),
        "raw_pil_cpu_ms_per_sample": round(statistics.median(c for _, c in runs["raw_pil"]), 4),
        "datamodule_cpu_ms_per_sample": round(statistics.median(c for _, c in runs["datamodule"]), 4),
        "all_runs_samples_per_s": {name: [round(r, 1) for r, _ in values] for name, values in runs.items()},
    }
    result["cpu_ratio"] = round(result["raw_pil_cpu_ms_per_sample"] / result["datamodule_cpu_ms_per_sample"], 3)
    ratio = result["datamodule_samples_per_s"] / result["raw_pil_samples_per_s"]
    write_result("data_throughput", args, result, ratio=ratio, target=">= 0.9",
                 ratio_definition="DataModule samples/s / raw PIL loop samples/s (wall clock)",
                 packages=("pillow", "webdataset"),
                 summary=("raw_pil_samples_per_s", "datamodule_samples_per_s", "cpu_ratio", "all_runs_samples_per_s"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
