"""`ShardDataModule`: the one streaming DataModule every stage trains from (webdataset shards -> dict batches).

Batch format: docs/conventions.md. Epochs are exhaustive (every sample read once per epoch by exactly one
rank/worker, the same number of full batches on every rank) or resampled (shards drawn with replacement, a fixed
`samples_per_epoch`). Order is a pure function of (seed, epoch, rank, worker, shard list); the epoch comes from
the trainer and reaches persistent workers through shared memory. Corrupt samples are skipped, warned about and
counted; the counts travel with the batches and are logged per epoch as `data/skipped_samples` (summed over ranks).

Exact resume: `state_dict` holds, for every rank, where its train loader stands after the batches the training
loop has consumed (`trainer.fit_loop.epoch_loop.batch_progress.current.ready`, not what was prefetched): epoch,
batches, and per worker the raw samples pulled and batches yielded. `load_state_dict` hands each rank its own
position; the loader's next pass of that epoch fast-forwards every worker without decoding (see `stream.py`,
`loader.py`) and yields exactly the batches an uninterrupted run would have yielded next. A checkpoint from
another layout (ranks, workers, batch size, samples per epoch) restarts the epoch from its start, with a warning.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from data_pipelines.decoding import IMAGE_EXTENSIONS, RESERVED_NAMES, TENSOR_EXTENSIONS, Collate, SampleDecoder, tensor_name
from data_pipelines.shard_counts import shard_sample_counts
from data_pipelines.loader import LoaderPosition, ShardLoader, SkipTally
from data_pipelines.stream import ShardStream
from data_pipelines.urls import check_pipe_policy, resolve_shards
from lightning_diffusion.errors import UserError

# Our IterableDataset's __len__ is exact per rank (see epoch_plan), so Lightning's generic caution does not apply.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

Tokenizer = Callable[[list[str]], torch.Tensor]


class SkippedSamplesLogger(Callback):
    """Logs `data/skipped_samples` (train) and `data/skipped_samples_val` per epoch, summed over ranks.

    `ShardDataModule.setup` adds it to the trainer, so every stage gets it without config.
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module, "train", "data/skipped_samples")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val", "data/skipped_samples_val")

    @staticmethod
    def _log(trainer: Trainer, pl_module: LightningModule, split: str, name: str) -> None:
        datamodule = trainer.datamodule
        if isinstance(datamodule, ShardDataModule) and split in datamodule.tallies:
            count = float(datamodule.tallies[split].epoch)
            pl_module.log(name, count, on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True, batch_size=1)


def _positive(key: str, value: Any, example: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"data.{key} must be a positive integer, got {value!r}; set e.g. data.{key}: {example}")


def _checked_tokenizer(tokenizer: Any, where: str, num_workers: int) -> Tokenizer:
    owner = getattr(tokenizer, "__self__", None)
    if isinstance(tokenizer, torch.nn.Module) or isinstance(owner, torch.nn.Module):
        raise UserError(
            f"{where} is (a method of) a torch module, which would copy the model into every data worker; "
            "use a standalone tokenizer such as open_clip.get_tokenizer(name)"
        )
    if not callable(tokenizer):
        raise UserError(f"{where} is a {type(tokenizer).__name__}, not a callable list[str] -> LongTensor[B, L]")
    if num_workers > 0:
        try:
            pickle.dumps(tokenizer)
        except Exception as exn:
            raise UserError(f"{where} cannot be pickled for the data workers ({exn}); use a module-level tokenizer") from exn
    return tokenizer


class ShardDataModule(LightningDataModule):
    """Image-caption (or pre-encoded latent) webdataset shards -> dict batches for every stage.

    Args: train_urls / val_urls: shard patterns (braces, globs, lists). image_keys: entries tried in order for
    the image ([] for shards without images). tensor_keys: entries such as `latent.npy`, stacked under their
    base name. mode: "exhaustive" epochs (needs sample counts: manifest.json or tar listing) or "resampled"
    (`samples_per_epoch` for all ranks together). shuffle_buffer: samples held for shuffling (0: none).
    random_flip: horizontal flips (off by default: captions may say "facing right"). max_*: per-sample limits;
    larger samples are skipped and counted. label_field / label_classes: derive the `label` from a json metadata
    entry, its index in `label_classes` (e.g. `style` with [3d, flat]); a sample without one is skipped and counted.

    Validation is unshuffled and split into contiguous, equal runs of full batches per rank; the last
    `total % (world * val_batch_size)` samples are not evaluated (reported in `dropped_per_epoch`), so no rank
    waits on another in collectives. Corrupt samples are replaced by the samples after the worker's run, so the
    batch count never changes.
    """

    def __init__(
        self,
        train_urls: str | list[str],
        val_urls: str | list[str] | None = None,
        image_size: int = 64,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        mode: Literal["exhaustive", "resampled"] = "exhaustive",
        samples_per_epoch: int | None = None,
        image_keys: Sequence[str] = IMAGE_EXTENSIONS,
        caption_key: str = "txt",
        require_caption: bool = True,
        tensor_keys: Sequence[str] = (),
        random_flip: bool = False,
        allow_pipe_urls: bool = False,
        max_image_pixels: int | None = 40_000_000,
        max_image_bytes: int | None = 32 * 2**20,
        max_caption_bytes: int | None = 16_384,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
        prefetch_factor: int | None = None,
        label_field: str | None = None,
        label_classes: Sequence[str] = (),
    ) -> None:
        super().__init__()
        for key, value, example in (("image_size", image_size, 64), ("batch_size", batch_size, 32)):
            _positive(key, value, example)
        for key, value, example in (
            ("val_batch_size", val_batch_size, 32), ("samples_per_epoch", samples_per_epoch, 10_000),
            ("max_image_pixels", max_image_pixels, 40_000_000), ("max_image_bytes", max_image_bytes, 33_554_432),
            ("max_caption_bytes", max_caption_bytes, 16_384), ("prefetch_factor", prefetch_factor, 2),
        ):
            _positive(key, value, example, optional=True)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"data.num_workers must be 0 or more, got {num_workers!r}; set e.g. data.num_workers: 2")
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise UserError(f"data.shuffle_buffer must be 0 (off) or more, got {shuffle_buffer!r}; set e.g. data.shuffle_buffer: 1000")
        if mode not in ("exhaustive", "resampled"):
            raise UserError(f"data.mode must be 'exhaustive' or 'resampled', got {mode!r}")
        if mode == "resampled" and samples_per_epoch is None:
            raise UserError("data.samples_per_epoch is required with data.mode: resampled; set e.g. data.samples_per_epoch: 10000")
        if mode == "exhaustive" and samples_per_epoch is not None:
            raise UserError("data.samples_per_epoch applies only to data.mode: resampled; remove it or set data.mode: resampled")
        if isinstance(image_keys, str) or isinstance(tensor_keys, str):
            raise UserError("data.image_keys and data.tensor_keys are lists, e.g. [png, jpg] and [latent.npy]")
        image_keys = tuple(key.lower() for key in image_keys)
        tensor_keys = tuple(key.lower() for key in tensor_keys)
        for entry in tensor_keys:
            if entry.rsplit(".", 1)[-1] not in TENSOR_EXTENSIONS or tensor_name(entry) in RESERVED_NAMES or "." not in entry:
                raise UserError(
                    f"data.tensor_keys: {entry!r} must end in .npy, .pth or .pt and not be named "
                    f"{'/'.join(RESERVED_NAMES)}; e.g. latent.npy"
                )
        if not image_keys and not tensor_keys:
            raise UserError("data.image_keys and data.tensor_keys are both empty; name the entries to load, e.g. image_keys: [png]")
        labels_given = label_field is not None or bool(label_classes)
        if labels_given and (not label_field or isinstance(label_classes, str) or len(set(label_classes)) < 2):
            raise UserError("data.label_field and data.label_classes go together: a json metadata key and at least two "
                            "distinct values, e.g. label_field: style, label_classes: [3d, flat]")
        check_pipe_policy(train_urls, "data.train_urls", allow_pipe_urls)
        check_pipe_policy(val_urls, "data.val_urls", allow_pipe_urls)
        self.train_urls, self.val_urls = train_urls, val_urls
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.mode, self.samples_per_epoch, self.random_flip = mode, samples_per_epoch, random_flip
        self.allow_pipe_urls, self.persistent_workers = allow_pipe_urls, persistent_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.decoder = SampleDecoder(
            image_size=image_size, image_keys=image_keys, caption_key=caption_key.lower(),
            require_caption=require_caption, tensor_keys=tensor_keys, max_image_pixels=max_image_pixels,
            max_image_bytes=max_image_bytes, max_caption_bytes=max_caption_bytes, label_field=label_field,
            label_classes=tuple(label_classes),
        )
        self.tallies: dict[str, SkipTally] = {}
        self.dropped_per_epoch: dict[str, int] = {}
        self._tokenizer: Tokenizer | None = None
        self._shard_cache: dict[str, tuple[list[str], list[int] | None]] = {}
        self._epoch = 0
        self._train_loader: ShardLoader | None = None
        self._resume_positions: list[dict[str, Any]] | None = None

    @property
    def skipped_samples(self) -> dict[str, int]:
        """Samples this rank skipped as unreadable, per split, since construction."""
        return {split: tally.total for split, tally in self.tallies.items()}

    @property
    def tensor_keys(self) -> tuple[str, ...]:
        """The pre-encoded entries each sample loads (e.g. `latent.npy`), lower-cased."""
        return self.decoder.tensor_keys

    def shard_urls(self, split: str) -> list[str]:
        """The shard files of `train` or `val` (patterns resolved; [] for a split without urls)."""
        if split == "val" and self.val_urls is None:
            return []
        return list(self._shards(split)[0])

    def set_tokenizer(self, tokenizer: Tokenizer | None) -> None:
        """Tokenize captions in the workers' collate (overrides the LightningModule's `tokenizer`)."""
        self._tokenizer = None if tokenizer is None else _checked_tokenizer(tokenizer, "set_tokenizer()", self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        """The epoch to stream when no trainer is attached (a trainer's `current_epoch` takes precedence)."""
        self._epoch = epoch

    def setup(self, stage: str) -> None:
        if self.trainer is not None:  # `Trainer.fit(model, datamodule)` from Python; the CLI checked it before
            from lightning_diffusion.training.consistency import check_model_matches_data

            check_model_matches_data(self.trainer.lightning_module, self)
        if stage == "fit":
            self._shards("train")
        if stage in ("fit", "validate") and self.val_urls is not None:
            self._shards("val")
        trainer = self.trainer
        if trainer is not None and not any(isinstance(callback, SkippedSamplesLogger) for callback in trainer.callbacks):
            trainer.callbacks.append(SkippedSamplesLogger())

    def train_dataloader(self) -> ShardLoader:
        self._train_loader = self._loader("train", self.batch_size, train=True)
        self._hand_over_resume_position()
        return self._train_loader

    def val_dataloader(self) -> ShardLoader | list:
        return [] if self.val_urls is None else self._loader("val", self.val_batch_size, train=False)

    def state_dict(self) -> dict[str, Any]:
        """Seed, epoch and every rank's train position (with the shard list they fix what comes next)."""
        state = {"seed": self.seed, "epoch": self._current_epoch(), "mode": self.mode, "skipped_samples": self.skipped_samples}
        position = self._train_position()
        if position is not None:
            state["train_positions"] = self._gathered(position.to_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            rank_zero_warn(f"data.seed is {self.seed} but the checkpoint was trained with {state_dict['seed']}; using {self.seed}")
        self._epoch = int(state_dict.get("epoch", 0))
        self._resume_positions = state_dict.get("train_positions")
        if self._train_loader is not None:
            self._hand_over_resume_position()

    def _train_position(self) -> LoaderPosition | None:
        """This rank's position after the batches the fit loop consumed (all yielded ones outside a fit)."""
        loader = self._train_loader
        if loader is None or loader.position() is None:
            return None
        consumed = None
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit" and loader.position().epoch == trainer.current_epoch:
            consumed = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return loader.position(consumed)

    def _gathered(self, position: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's position, indexed by rank (checkpoints are dumped on every rank and written by rank 0)."""
        rank, world = self._rank_world()
        if world == 1 or not (dist.is_available() and dist.is_initialized()):
            return [position]
        positions: list[Any] = [None] * world
        dist.all_gather_object(positions, position)
        return positions

    def _hand_over_resume_position(self) -> None:
        if self._resume_positions is None or self._train_loader is None:
            return
        positions, self._resume_positions = self._resume_positions, None
        rank, world = self._rank_world()
        loader = self._train_loader
        position = LoaderPosition.from_dict(positions[rank]) if len(positions) == world else None
        if position is None or position.layout != loader.layout:
            rank_zero_warn(
                "the checkpoint's data position was saved with another layout (samples per epoch, ranks, workers, "
                f"batch size: {positions[0]['layout']} vs now {list(loader.layout)}); this epoch restarts from its "
                "first batch. Resume with the same data settings and number of ranks for an exact resume"
            )
            return
        loader.resume_from(position)

    def _rank_world(self) -> tuple[int, int]:
        """(global rank, world size): the trainer's, else torch.distributed's, else (0, 1); patched in tests."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else self._epoch

    def _resolve_tokenizer(self) -> Tokenizer | None:
        if self._tokenizer is not None:
            return self._tokenizer
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            return None
        return _checked_tokenizer(tokenizer, f"{type(module).__name__}.tokenizer", self.num_workers)

    def _shards(self, split: str) -> tuple[list[str], list[int] | None]:
        if split not in self._shard_cache:
            key = f"data.{split}_urls"
            urls = resolve_shards(self.train_urls if split == "train" else self.val_urls, key, self.allow_pipe_urls)
            needs_counts = split == "val" or self.mode == "exhaustive"
            self._shard_cache[split] = (urls, shard_sample_counts(urls, key) if needs_counts else None)
        return self._shard_cache[split]

    def train_batches(self, world: int = 1) -> int:
        """Training batches per rank and epoch on `world` ranks (before any loader is built)."""
        _, counts = self._shards("train")
        total = self.samples_per_epoch if self.mode == "resampled" else sum(counts)
        return total // (world * self.batch_size)

    def _loader(self, split: str, batch_size: int, train: bool) -> ShardLoader:
        urls, counts = self._shards(split)
        rank, world = self._rank_world()
        resampled = train and self.mode == "resampled"
        stream = ShardStream(
            urls, counts, split=split, decoder=self.decoder,
            collate=Collate(tensor_names=tuple(tensor_name(e) for e in self.decoder.tensor_keys), tokenizer=self._resolve_tokenizer()),
            batch_size=batch_size, rank=rank, world_size=world, num_workers=self.num_workers, seed=self.seed,
            shuffle_shards=train, shuffle_buffer=self.shuffle_buffer if train else 0,
            random_flip=train and self.random_flip, samples_per_epoch=self.samples_per_epoch if resampled else None,
        )
        layout = stream.layout
        if layout.batches_per_rank == 0:
            raise UserError(
                f"data.{split}_urls: {layout.total} samples give no full batch of {batch_size} per rank on {world} "
                f"rank(s); lower data.{'batch_size' if train else 'val_batch_size'} or add data"
            )
        self.dropped_per_epoch[split] = layout.dropped
        rank_zero_info(
            f"{split} data: {'resampled' if resampled else 'exhaustive'}, {layout.total} samples per epoch from "
            f"{len(urls)} shards -> {layout.batches_per_rank} batches of {batch_size} per rank ({world} rank(s) x "
            f"{layout.workers} worker(s)); {layout.dropped} samples left out per epoch"
        )
        self.tallies.setdefault(split, SkipTally())
        workers = self.num_workers
        return ShardLoader(
            stream, epoch_fn=self._current_epoch, tally=self.tallies[split], num_workers=workers,
            persistent_workers=self.persistent_workers and workers > 0,
            pin_memory=torch.cuda.is_available() if self.pin_memory is None else self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )
