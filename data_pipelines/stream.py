"""The per-worker sample stream: read this worker's share of the shards, shuffle, decode, skip bad samples, batch.

Tar parsing and the shuffle buffer are webdataset's (`tar_file_expander`, `group_by_keys`, `shuffle`); the split
across ranks and workers is explicit (see `epoch_plan`) because webdataset's shard-level `split_by_node` /
`split_by_worker` cannot promise every rank the same number of full batches. Batches are collated in the worker
and carry, under `SKIPPED_KEY`, how many samples were skipped since the previous batch, and under `POSITION_KEY`
where the worker stands; the loader in `loader.py` pops both in the main process.

Exact mid-epoch resume. A worker's raw stream (its shards read in plan order, then webdataset's shuffle buffer,
then the replacement reads) is a pure function of (seed, epoch, rank, worker), and so is everything after it
(decoding, per-key flips, batching). A worker's position is therefore two numbers: raw items it has pulled
(including the ones that failed to decode) and batches it has yielded. To resume, the worker pulls that many raw
items again *without decoding them* (the shuffle buffer is replayed, so it reads but does not decode the shards'
bytes up to that point) and goes on. The DataLoader serves its workers round-robin and every worker's share of
batches is the same up to one, larger shares first, so batch `p` of the epoch always comes from worker
`p % workers`; a loader resumed after `n` batches lets DataLoader worker `i` play worker `(i + n) % workers`, so
the round-robin continues where it stopped. The start (offset and per-worker positions) is in shared memory, like
the epoch, so persistent workers see it.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from data_pipelines.decoding import DUPLICATE_MARK, Collate, SampleDecoder
from data_pipelines.epoch_plan import EpochLayout, derive_seed, refill_segments, segments_between, shard_order
from data_pipelines.tar_members import is_plain_tar, local_tar_files
from data_pipelines.urls import url_scheme
from lightning_diffusion.errors import UserError

SKIPPED_KEY = "__skipped__"
POSITION_KEY = "__position__"
REPLACEMENT_KEY = "__replacement__"
MAX_WARNINGS_PER_WORKER = 20
MAX_CONSECUTIVE_FAILURES = 1000


class SkippedSampleWarning(UserWarning):
    """A sample was skipped because it could not be read or decoded (it is counted, training goes on)."""


def flag_duplicates(files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Rename a member whose sample already has its extension (`s2.png` twice, or `s2.png` and `s2.PNG`) to
    `s2.__duplicate<n>__.png`: webdataset's `group_by_keys` would raise and end the shard there; this way only that
    sample is skipped (by the decoder, which names it)."""
    key, seen = None, set()
    try:
        for member in files:
            if member:
                prefix, suffix = base_plus_ext(member["fname"])
                if prefix is not None:
                    if prefix != key:
                        key, seen = prefix, set()
                    suffix = suffix.lower()
                    if suffix in seen:
                        member = {**member, "fname": f"{prefix}.{DUPLICATE_MARK}{len(seen)}__.{suffix}"}
                    seen.add(suffix)
            else:
                key, seen = None, set()
            yield member
    finally:
        close = getattr(files, "close", None)
        if close is not None:
            close()


class ShapeReference:
    """The shape of each tensor entry in this worker's first good sample; a sample with another shape raises."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names, self.shapes, self.first = names, {}, None

    def check(self, decoded: dict[str, Any]) -> None:
        for name in self.names:
            shape = tuple(decoded[name].shape)
            expected = self.shapes.get(name)
            if expected is not None and shape != expected:
                raise ValueError(f"{name} has shape {list(shape)}, the other samples (from {self.first!r}) "
                                 f"{list(expected)}; rewrite this sample")
        if self.first is None and self.names:
            self.shapes = {name: tuple(decoded[name].shape) for name in self.names}
            self.first = decoded["key"]


class SkipLog:
    """Counts one worker's skipped samples and warns (with shard and key) about the first few.

    A quiet log is used for replacement reads (samples borrowed from after this worker's range): their bad
    samples belong to another worker's range, which counts them, so each bad sample is counted once.
    """

    def __init__(self, split: str, quiet: bool = False) -> None:
        self.split, self.quiet, self.pending, self.reported = split, quiet, 0, 0

    def record(self, url: str | None, key: str | None, reason: str, count: int = 1) -> None:
        if count <= 0 or self.quiet:
            return
        self.pending += count
        self.reported += 1
        if self.reported <= MAX_WARNINGS_PER_WORKER:
            where = f"sample {key!r} of {url}" if key is not None else f"{url}"
            warnings.warn(f"{self.split} data: skipped {count} sample(s) at {where}: {reason}", SkippedSampleWarning)
        if self.reported == MAX_WARNINGS_PER_WORKER:
            warnings.warn(f"{self.split} data: further skipped samples in this worker are counted without warnings", SkippedSampleWarning)

    def take(self) -> int:
        pending, self.pending = self.pending, 0
        return pending


@dataclass(frozen=True)
class WorkerPosition:
    """Where one (rank, worker) stands in its epoch: raw samples pulled (decoded or not) and batches yielded."""

    raw: int = 0
    batches: int = 0


class ShardStream(IterableDataset):
    """One rank's stream of collated batches; `len()` is the exact number of batches this rank yields per epoch.

    `counts` (samples per shard) is required for exhaustive epochs; `samples_per_epoch` (all ranks together)
    switches to resampled epochs: each worker draws shards with replacement from a (seed, epoch, rank,
    worker) generator. The epoch lives in shared memory so `set_epoch` reaches persistent workers too.
    """

    def __init__(
        self,
        urls: list[str],
        counts: list[int] | None,
        *,
        split: str,
        decoder: SampleDecoder,
        collate: Collate,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        shuffle_shards: bool,
        shuffle_buffer: int,
        random_flip: bool = False,
        samples_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if samples_per_epoch is None and counts is None:
            raise ValueError("exhaustive epochs need per-shard sample counts")
        self.urls, self.counts, self.split = urls, counts, split
        self.decoder, self.collate = decoder, collate
        self.rank, self.seed = rank, seed
        self.shuffle_shards, self.shuffle_buffer, self.random_flip = shuffle_shards, shuffle_buffer, random_flip
        self.resampled = samples_per_epoch is not None
        total = samples_per_epoch if samples_per_epoch is not None else sum(counts)
        self.layout = EpochLayout(total=total, world=world_size, workers=max(1, num_workers), batch=batch_size)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        # [round-robin offset, raw_0, batches_0, raw_1, batches_1, ...]: where the next iteration starts
        self._start = torch.zeros(1 + 2 * self.layout.workers, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return self.layout.batches_per_rank

    def set_start(self, batches_done: int, positions: list[WorkerPosition] | None) -> None:
        """Start the next iteration after `batches_done` batches, worker `w` at `positions[w]` (None: from the start)."""
        start = [batches_done % self.layout.workers]
        for position in positions or [WorkerPosition()] * self.layout.workers:
            start += [position.raw, position.batches]
        self._start.copy_(torch.tensor(start, dtype=torch.int64))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.layout.workers:
            raise RuntimeError(f"this stream was planned for {self.layout.workers} workers but runs in {workers}")
        start = self._start.tolist()
        worker = (loader_worker + start[0]) % workers  # the round-robin resumes at the right worker
        return self.iter_worker(worker, self.epoch, WorkerPosition(start[1 + 2 * worker], start[2 + 2 * worker]))

    def iter_worker(self, worker: int, epoch: int, start: WorkerPosition = WorkerPosition()) -> Iterator[dict[str, Any]]:
        """The batches of one (rank, worker) in `epoch` after `start`: a pure function of the seed, epoch, rank,
        worker and shards. Each batch carries the worker's position after it under `POSITION_KEY`."""
        begin, end = self.layout.worker_range(self.rank, worker)
        quota = end - begin
        produced, batches = start.batches * self.layout.batch, start.batches
        if produced >= quota:
            return
        skips = SkipLog(self.split)
        seeds = ("samples", self.seed, epoch, self.rank, worker)
        if self.resampled:
            raw = self._shuffled(self._resampled_raw(worker, epoch, skips), seeds)
        else:
            order = shard_order(len(self.urls), self.seed, epoch, self.shuffle_shards)
            own = self._read_all(segments_between(self.counts, order, begin, end), skips)
            quiet = SkipLog(self.split, quiet=True)
            replacements = self._read_all(refill_segments(self.counts, order, end), quiet, replacement=True)
            raw = chain(self._shuffled(own, seeds), replacements)
        if start.raw:  # fast-forward: pull what was pulled before, without decoding (its bad reads were counted then)
            skips.quiet = True
            for _ in islice(raw, start.raw):
                pass
            skips.quiet = False
        batch: list[dict[str, Any]] = []
        for pulled, sample in self._decoded(raw, skips, epoch, start.raw):
            batch.append(sample)
            if len(batch) == self.layout.batch:
                collated = self.collate(batch)
                collated[SKIPPED_KEY] = skips.take()
                produced, batches, batch = produced + len(batch), batches + 1, []
                collated[POSITION_KEY] = (worker, pulled, batches)
                yield collated
                if produced >= quota:
                    return
        raise UserError(
            f"{self.split} data: only {produced + len(batch)} of the {quota} samples this worker needs are readable "
            f"in {len(self.urls)} shards; rebuild the shards (see the warnings above for the bad ones)"
        )

    def _shuffled(self, samples: Iterator[dict[str, Any]], seed_parts: tuple) -> Iterator[dict[str, Any]]:
        if self.shuffle_buffer <= 1:
            return samples
        rng = random.Random(derive_seed(*seed_parts))
        return shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)

    def _read_all(self, segments: list, skips: SkipLog, replacement: bool = False) -> Iterator[dict[str, Any]]:
        for segment in segments:
            for sample in self._read_shard(segment.shard, segment.start, segment.stop, skips):
                if replacement:
                    sample[REPLACEMENT_KEY] = True
                yield sample

    def _resampled_raw(self, worker: int, epoch: int, skips: SkipLog) -> Iterator[dict[str, Any]]:
        rng = random.Random(derive_seed("resample", self.seed, epoch, self.rank, worker))
        empty_reads = 0
        while empty_reads <= 2 * len(self.urls) + 10:
            read, shard = 0, rng.randrange(len(self.urls))
            stop = self.counts[shard] if self.counts is not None else None
            for sample in self._read_shard(shard, 0, stop, skips):
                read += 1
                yield sample
            empty_reads = 0 if read else empty_reads + 1
        raise UserError(f"{self.split} data: no readable sample in {len(self.urls)} shards; rebuild the shards")

    def _read_shard(self, shard: int, start: int, stop: int | None, skips: SkipLog) -> Iterator[dict[str, Any]]:
        """Raw samples [start, stop) of one shard; a read error or a short shard skips (and counts) the rest."""
        url = self.urls[shard]
        position, last_key, stream = 0, None, None
        try:
            if url_scheme(url) is None and is_plain_tar(url):
                files, position = local_tar_files(url, skip_samples=start), start
            else:
                stream = gopen(url)
                files = tar_file_expander(iter([{"url": url, "stream": stream}]))
            try:
                for sample in group_by_keys(flag_duplicates(files)):
                    if stop is not None and position >= stop:
                        return
                    if position >= start:
                        yield sample
                    position, last_key = position + 1, sample["__key__"]
            finally:
                files.close()
                if stream is not None:
                    stream.close()
        except Exception as exn:  # a truncated or unreadable shard must not end the epoch early
            after = f"after {last_key!r}" if last_key is not None else "at its start"
            missing = (stop - max(start, position)) if stop is not None else 1
            skips.record(url, None, f"unreadable {after} ({type(exn).__name__}: {exn})", missing)
            return
        if stop is not None and position < stop:
            skips.record(url, None, f"has {position} samples, expected {stop} (stale manifest?)", stop - max(start, position))

    def _decoded(self, raw: Iterator[dict[str, Any]], skips: SkipLog, epoch: int, pulled: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(raw samples pulled so far, decoded sample); a sample's flip is a function of (seed, epoch, key).

        Tensor entries must keep the shape of this worker's first decoded sample (they are stacked into batches):
        one of another shape is skipped like an undecodable image."""
        failures, shapes = 0, ShapeReference(self.collate.tensor_names)
        for pulled, sample in enumerate(raw, start=pulled + 1):
            try:
                decoded = self.decoder(sample)
                shapes.check(decoded)
            except Exception as exn:  # one bad sample is skipped and counted, never fatal
                if not sample.get(REPLACEMENT_KEY, False):
                    skips.record(sample.get("__url__"), sample.get("__key__"), f"{type(exn).__name__}: {exn}")
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise UserError(
                        f"{self.split} data: {failures} samples in a row failed to decode, the last with "
                        f"{type(exn).__name__}: {exn}; check data.image_keys / data.caption_key / data.tensor_keys"
                    ) from exn
                continue
            failures = 0
            if self.random_flip and "image" in decoded and derive_seed("flip", self.seed, epoch, decoded["key"]) % 2:
                decoded["image"] = decoded["image"][:, ::-1]
            yield pulled, decoded
