"""Which samples each (rank, worker) reads in an epoch: pure arithmetic, no I/O.

Exhaustive epochs: the shard list (shuffled by (seed, epoch), identically on every rank) is seen as one sequence
of `total` samples. Each rank gets `batches_per_rank = total // (world * batch)` full batches, a contiguous run of
`batches_per_rank * batch` samples; its workers split those batches as evenly as possible, again contiguously.
So every sample is read by exactly one (rank, worker), every rank yields the same number of full batches (no
DDP hang), and only the `total % (world * batch)` samples at the end of the epoch's order are left out (a
different tail each epoch when shards are shuffled). A worker's run may start or stop inside a shard; it then
streams past the samples before its start without decoding them.

Everything here is a function of (seed, epoch, rank, worker, shard counts), which is what exact mid-epoch resume
builds on (see `stream.py`): a worker resumes by pulling its first k raw samples again without decoding them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass


def derive_seed(*parts: int | str) -> int:
    """A 64-bit seed from the parts; stable across processes and Python runs (unlike `hash`)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` items into `parts` shares differing by at most one, larger shares first."""
    base, extra = divmod(total, parts)
    return [base + (index < extra) for index in range(parts)]


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of shard number `shard` (an index into the shard list)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EpochLayout:
    """How an epoch of `total` samples is cut into full batches for `world` ranks of `workers` workers."""

    total: int
    world: int
    workers: int
    batch: int

    @property
    def batches_per_rank(self) -> int:
        return self.total // (self.world * self.batch)

    @property
    def dropped(self) -> int:
        """Samples left out per epoch (all ranks together): the unavoidable remainder."""
        return self.total - self.batches_per_rank * self.world * self.batch

    def worker_batches(self) -> list[int]:
        return split_evenly(self.batches_per_rank, self.workers)

    def worker_range(self, rank: int, worker: int) -> tuple[int, int]:
        """Positions [begin, end) of this (rank, worker) in the epoch's sample order."""
        shares = self.worker_batches()
        begin = (rank * self.batches_per_rank + sum(shares[:worker])) * self.batch
        return begin, begin + shares[worker] * self.batch


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's shard order, the same on every rank and worker."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    return order


def segments_between(counts: list[int], order: list[int], begin: int, end: int) -> list[Segment]:
    """Positions [begin, end) of the concatenation of the shards in `order`, as per-shard pieces."""
    pieces, offset = [], 0
    for shard in order:
        if offset >= end:
            break
        low, high = max(begin, offset), min(end, offset + counts[shard])
        if low < high:
            pieces.append(Segment(shard, low - offset, high - offset))
        offset += counts[shard]
    return pieces


def refill_segments(counts: list[int], order: list[int], end: int) -> list[Segment]:
    """Everything after position `end`, wrapping round once: replacements for samples that turn out corrupt."""
    total = sum(counts)
    return segments_between(counts, order, end, total) + segments_between(counts, order, 0, end)
