"""Two gloo ranks: real statistics gathered across ranks and FID/KID computed on every rank equal the
single-process numbers (cached real statistics are loaded so that the cross-rank sum counts them once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_diffusion.metrics.frechet import FrechetSuite
from lightning_diffusion.metrics.real_stats import compute_real_statistics
from test_metrics import TinyEncoder, images

REAL, FAKE = images(16, 1), images(16, 2, shift=0.5)


def score(rank: int, world: int) -> dict[str, float]:
    """Real statistics from this rank's share of REAL, then FID/KID of this rank's share of FAKE."""
    encoder = TinyEncoder()
    suite = FrechetSuite(encoder, metrics=("fid", "kid"), kid_subset_size=16, kid_subsets=2)
    real_batches = REAL[rank::world].split(4)
    stats = compute_real_statistics(suite.encode, real_batches, encoder.num_features, 100, keep_features=True)
    suite.load_real(stats)
    for batch in FAKE[rank::world].split(4):
        suite.update(batch, real=False)
    return {**suite.compute(len(FAKE)), "n_real": stats.n}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(score(rank, world)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch + torchmetrics: ~10 s idle, 30-50 s on a busy machine
def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    mp.start_processes(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")  # fork after OpenMP use can hang
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = score(0, 1)
    assert ranks[0] == ranks[1]  # every rank computes the same, complete numbers
    assert ranks[0]["n_real"] == single["n_real"] == 16
    assert ranks[0]["fd_tiny@16"] == pytest.approx(single["fd_tiny@16"], rel=1e-6)
    # subsets of all 16 features: the unbiased MMD is then independent of the order the ranks gathered them in
    assert ranks[0]["kd_tiny@16"] == pytest.approx(single["kd_tiny@16"], rel=1e-6)
