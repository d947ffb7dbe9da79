"""`ShardLoader`: the DataLoader over a `ShardStream`, which knows where it stands in the epoch (for exact resume).

Each batch arrives from its worker with that worker's position (raw samples pulled, batches yielded; see
`stream.py`). The loader keeps the positions after each of its last `HISTORY` batches, so
`position(consumed)` can describe the state after the batches the training loop has actually consumed, not after
those a prefetcher has already taken. `resume_from(position)` makes the next iteration of the same epoch start
right after that position: the first batch it yields is the one an uninterrupted run would have yielded next.
The epoch and the start are read when the first batch is requested, not at `iter()`, because Lightning creates
the iterator before it has restored where the epoch stands.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader

from data_pipelines.stream import POSITION_KEY, SKIPPED_KEY, ShardStream, WorkerPosition

HISTORY = 64  # batches yielded but possibly not consumed yet (Lightning prefetches at most one)


@dataclass
class SkipTally:
    """Skipped samples seen by this rank's main process: this epoch and since construction."""

    epoch: int = 0
    total: int = 0

    def start_epoch(self) -> None:
        self.epoch = 0

    def add(self, count: int) -> None:
        self.epoch += count
        self.total += count


@dataclass(frozen=True)
class LoaderPosition:
    """One rank's place in an epoch: `batches` consumed and each worker's position after them.

    `layout` is (samples per epoch, ranks, workers, batch size): a position means nothing under another layout.
    """

    epoch: int
    batches: int
    workers: tuple[WorkerPosition, ...]
    layout: tuple[int, int, int, int]

    def to_dict(self) -> dict[str, Any]:
        """Plain ints and lists, so the checkpoint loads with `weights_only=True`."""
        workers = [[worker.raw, worker.batches] for worker in self.workers]
        return {"epoch": self.epoch, "batches": self.batches, "workers": workers, "layout": list(self.layout)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> LoaderPosition:
        workers = tuple(WorkerPosition(int(raw), int(batches)) for raw, batches in state["workers"])
        return cls(int(state["epoch"]), int(state["batches"]), workers, tuple(int(v) for v in state["layout"]))


@dataclass
class _Pass:
    """The iteration in progress: its epoch and the positions after its last batches (`batches` -> workers)."""

    epoch: int
    batches: int
    workers: list[WorkerPosition]
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY + 1))


class ShardLoader(DataLoader):
    """DataLoader over a `ShardStream`: sets the epoch (and the resume point) before each pass, pops the
    skipped-sample counts and the worker positions, and reports its position for checkpoints."""

    def __init__(self, dataset: ShardStream, *, epoch_fn: Callable[[], int], tally: SkipTally, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.epoch_fn, self.tally = epoch_fn, tally
        self._resume: LoaderPosition | None = None
        self._pass: _Pass | None = None

    @property
    def layout(self) -> tuple[int, int, int, int]:
        layout = self.dataset.layout
        return (layout.total, layout.world, layout.workers, layout.batch)

    def resume_from(self, position: LoaderPosition | None) -> None:
        """Start the next pass after `position` if that pass is of the same epoch and the epoch is not finished."""
        self._resume = position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._batches()

    def _batches(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch_fn()
        start, self._resume = self._resume, None
        if start is None or start.epoch != epoch or start.batches >= len(self):
            start = LoaderPosition(epoch, 0, (WorkerPosition(),) * self.layout[2], self.layout)
        self.dataset.set_epoch(epoch)
        self.dataset.set_start(start.batches, list(start.workers))
        self.tally.start_epoch()
        self._pass = current = _Pass(epoch, start.batches, list(start.workers))
        current.history.append((current.batches, tuple(current.workers)))
        for batch in super().__iter__():
            self.tally.add(int(batch.pop(SKIPPED_KEY, 0)))
            worker, raw, done = batch.pop(POSITION_KEY)
            current.workers[worker] = WorkerPosition(int(raw), int(done))
            current.batches += 1
            current.history.append((current.batches, tuple(current.workers)))
            yield batch

    def position(self, consumed: int | None = None) -> LoaderPosition | None:
        """The position after the first `consumed` batches of the current pass (None: all it has yielded).

        None before the first pass. A `consumed` outside the remembered batches gives the latest position.
        """
        current = self._pass
        if current is None:
            return None
        for batches, workers in reversed(current.history):
            if consumed is None or batches == consumed:
                return LoaderPosition(current.epoch, batches, workers, self.layout)
        return LoaderPosition(current.epoch, current.batches, tuple(current.workers), self.layout)

    # Lightning treats a loader with state_dict/load_state_dict as resumable (no "not resumable" warning). The
    # position of every rank is saved by `ShardDataModule.state_dict`; Lightning's copy would hold rank 0's only.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass
