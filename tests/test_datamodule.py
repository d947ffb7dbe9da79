"""ShardDataModule: per-rank/per-worker splitting, epochs, resampling, bad samples, tokens, latents, errors.

Shards are written here with webdataset's TarWriter (tiny PNGs). Ranks are simulated by patching
`_rank_world`; workers by calling `ShardStream.iter_worker` (and, where it matters, real DataLoader workers).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from data_pipelines import ShardDataModule
from data_pipelines.epoch_plan import EpochLayout, refill_segments, segments_between, shard_order
from data_pipelines.shard_counts import count_tar_samples, shard_sample_counts
from data_pipelines.stream import SKIPPED_KEY, SkippedSampleWarning
from lightning_diffusion.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def png_bytes(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size + seed % 5, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(directory: Path, counts: list[int], prefix: str = "train", extra=None) -> list[str]:
    """Shards `{prefix}-00000i.tar` with counts[i] samples keyed `{prefix}{i}_{j}`; returns all keys."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard, count in enumerate(counts):
        with wds.TarWriter(str(directory / f"{prefix}-{shard:06d}.tar")) as writer:
            for index in range(count):
                key = f"{prefix}{shard}_{index:03d}"
                sample = {"__key__": key, "png": png_bytes(shard * 1000 + index), "txt": f"a picture {key}",
                          "json": {"source": "test", "label": index % 3}}
                if extra is not None:
                    sample.update(extra(shard, index))
                writer.write(sample)
                keys.append(key)
    return keys


def datamodule(directory: Path, prefix: str = "train", **kwargs) -> ShardDataModule:
    options = dict(image_size=8, batch_size=3, num_workers=2, shuffle_buffer=5, seed=7)
    options.update(kwargs)
    return ShardDataModule(str(directory / f"{prefix}-*.tar"), **options)


def rank_batches(dm: ShardDataModule, rank: int, world: int, epoch: int, split: str = "train") -> list[list[dict]]:
    """The batches of each worker of `rank` (of `world`) in `epoch`."""
    dm._rank_world = lambda: (rank, world)
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    stream = loader.dataset
    return [list(stream.iter_worker(worker, epoch)) for worker in range(stream.layout.workers)]


def keys_of(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


# ---------------------------------------------------------------- epoch arithmetic (pure, property-based)

@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    world=st.integers(1, 4), workers=st.integers(1, 4), batch=st.integers(1, 9),
    seed=st.integers(0, 5), epoch=st.integers(0, 3),
)
def test_plan_reads_every_used_sample_once_with_equal_full_batches(counts, world, workers, batch, seed, epoch):
    layout = EpochLayout(total=sum(counts), world=world, workers=workers, batch=batch)
    order = shard_order(len(counts), seed, epoch, shuffle=True)
    assert sorted(order) == list(range(len(counts)))
    seen = []
    for rank in range(world):
        rank_batch_count = 0
        for worker in range(workers):
            begin, end = layout.worker_range(rank, worker)
            assert (end - begin) % batch == 0
            rank_batch_count += (end - begin) // batch
            pieces = segments_between(counts, order, begin, end)
            assert sum(len(p) for p in pieces) == end - begin
            seen += [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]
            refill = refill_segments(counts, order, end)
            assert sum(len(p) for p in refill) == sum(counts)
        assert rank_batch_count == layout.batches_per_rank
    assert len(seen) == len(set(seen)) == sum(counts) - layout.dropped
    assert 0 <= layout.dropped < world * batch


# ---------------------------------------------------------------- exhaustive epochs over real shards

def test_exhaustive_two_ranks_two_workers_cover_the_epoch_disjointly(tmp_path):
    keys = write_shards(tmp_path, [7, 5, 9, 3])  # 24 = 2 ranks x 4 batches x 3: nothing is dropped
    dm = datamodule(tmp_path)
    per_rank = [rank_batches(dm, rank, 2, epoch=0) for rank in range(2)]
    seen = [keys_of(b) for workers in per_rank for b in workers]
    flat = [key for part in seen for key in part]
    assert sorted(flat) == sorted(keys) and len(set(flat)) == len(flat)
    for workers in per_rank:
        assert sum(len(b) for b in workers) == 4 == len(dm.train_dataloader())
        assert [len(b) for b in workers] == [2, 2]
        for batch in (b for w in workers for b in w):
            assert batch["image"].shape == (3, 3, 8, 8) and batch["image"].dtype == torch.float32
            assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
            assert batch["label"].dtype == torch.int64 and batch[SKIPPED_KEY] == 0
            assert batch["caption"] == [f"a picture {key}" for key in batch["key"]]
    assert dm.dropped_per_epoch["train"] == 0


@pytest.mark.parametrize("counts,batch", [([7, 5, 9, 4], 3), ([20, 1, 1, 2, 11], 4), ([2, 3], 2)])
def test_exhaustive_remainder_keeps_equal_full_batches_per_rank(tmp_path, counts, batch):
    keys = write_shards(tmp_path, counts)
    dm = datamodule(tmp_path, batch_size=batch)
    per_rank = [rank_batches(dm, rank, 2, epoch=1) for rank in range(2)]
    expected_batches = sum(counts) // (2 * batch)
    flat = []
    for workers in per_rank:
        batches = [b for w in workers for b in w]
        assert len(batches) == expected_batches == len(dm.train_dataloader())
        assert all(len(b["key"]) == batch for b in batches)
        flat += keys_of(batches)
    assert len(set(flat)) == len(flat) and set(flat) <= set(keys)
    assert dm.dropped_per_epoch["train"] == len(keys) - len(flat) == sum(counts) % (2 * batch)


def test_order_changes_with_epoch_and_is_reproducible(tmp_path):
    write_shards(tmp_path, [6, 6, 6, 6])
    order = lambda dm, epoch, seed=7: [keys_of(w) for w in rank_batches(dm, 0, 2, epoch)]  # noqa: E731
    first = order(datamodule(tmp_path), 0)
    assert first == order(datamodule(tmp_path), 0)
    assert first != order(datamodule(tmp_path), 1)
    assert first != order(datamodule(tmp_path, seed=8), 0)


def test_real_workers_follow_the_trainer_epoch(tmp_path):
    """Persistent workers see each new epoch (shared memory), and yield exactly the simulated plan."""
    write_shards(tmp_path, [6, 5, 7])
    dm = datamodule(tmp_path, num_workers=2, persistent_workers=True)
    dm.trainer = SimpleNamespace(current_epoch=0, global_rank=0, world_size=1, lightning_module=None, callbacks=[])
    loader = dm.train_dataloader()
    for epoch in (0, 3):
        dm.trainer.current_epoch = epoch
        got = sorted(tuple(b["key"]) for b in loader)
        expected = sorted(tuple(b["key"]) for w in range(2) for b in loader.dataset.iter_worker(w, epoch))
        assert got == expected and len(got) == len(loader) == 6
        assert all(SKIPPED_KEY not in b for b in loader)


def test_validation_is_deterministic_unshuffled_and_balanced(tmp_path):
    write_shards(tmp_path / "v", [5, 4, 6], prefix="val")
    write_shards(tmp_path / "t", [3])
    dm = ShardDataModule(str(tmp_path / "t" / "train-*.tar"), val_urls=str(tmp_path / "v" / "val-{000000..000002}.tar"),
                         image_size=8, batch_size=3, val_batch_size=2, num_workers=2, shuffle_buffer=50)
    runs = [[rank_batches(dm, rank, 2, epoch, split="val") for rank in range(2)] for epoch in (0, 5)]
    assert [[keys_of(w) for w in r] for r in runs[0]] == [[keys_of(w) for w in r] for r in runs[1]]
    assert torch.equal(runs[0][1][0][0]["image"], runs[1][1][0][0]["image"])
    ranks = [[key for w in r for key in keys_of(w)] for r in runs[0]]
    assert len(ranks[0]) == len(ranks[1]) == 6 and not set(ranks[0]) & set(ranks[1])
    assert ranks[0] + ranks[1] == sorted(ranks[0] + ranks[1])  # shard order, then sample order: no shuffle
    assert dm.dropped_per_epoch["val"] == 3


# ---------------------------------------------------------------- resampled epochs

def test_resampled_mode_yields_the_configured_batches(tmp_path):
    keys = write_shards(tmp_path, [4, 9])
    dm = datamodule(tmp_path, mode="resampled", samples_per_epoch=40, batch_size=4)
    for rank in range(2):
        workers = rank_batches(dm, rank, 2, epoch=0)
        assert [len(w) for w in workers] == [3, 2] and len(dm.train_dataloader()) == 5
        assert set(keys_of([b for w in workers for b in w])) <= set(keys)
    again = rank_batches(dm, 1, 2, epoch=0)
    assert keys_of(again[0]) == keys_of(rank_batches(dm, 1, 2, epoch=0)[0])
    assert keys_of(again[0]) != keys_of(rank_batches(dm, 1, 2, epoch=1)[0])


# ---------------------------------------------------------------- bad samples

def _truncate_inside_sample(path: Path, keep_samples: int) -> None:
    """Cut the tar in the middle of the png of sample number `keep_samples`."""
    import tarfile

    with tarfile.open(path) as archive:
        members = [m for m in archive.getmembers() if m.name.endswith(".png")]
    cut = members[keep_samples].offset_data + members[keep_samples].size // 2
    path.write_bytes(path.read_bytes()[:cut])


def test_corrupt_samples_and_truncated_tar_are_skipped_and_counted(tmp_path):
    bad = {1: {"png": png_bytes(1)[:40]}, 3: {"txt": b"caption \xff\xfe"}, 5: {"png": b"definitely not an image"}}

    def extra(shard, index):
        return bad.get(index, {}) if shard == 0 else {}

    keys = write_shards(tmp_path, [8, 8, 8], extra=extra)
    with wds.TarWriter(str(tmp_path / "train-000003.tar")) as writer:  # sample without caption
        writer.write({"__key__": "nocaption", "png": png_bytes(99)})
    _truncate_inside_sample(tmp_path / "train-000002.tar", keep_samples=4)
    listed = count_tar_samples(str(tmp_path / "train-000002.tar"))
    assert listed >= 4
    good = set(keys) - {"train0_001", "train0_003", "train0_005"} - {f"train2_{i:03d}" for i in range(4, 8)}
    dm = datamodule(tmp_path, batch_size=1, num_workers=0, shuffle_buffer=0)
    dm.trainer = SimpleNamespace(current_epoch=0, global_rank=0, world_size=1, lightning_module=None, callbacks=[])
    loader = dm.train_dataloader()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning)]
    assert any("train0_003" in m and "train-000000.tar" in m and "UnicodeDecodeError" in m for m in messages)
    assert any("train0_005" in m for m in messages) and any("nocaption" in m for m in messages)
    assert any("train-000002.tar" in m and "unreadable after 'train2_003'" in m for m in messages)
    seen = keys_of(batches)
    assert len(batches) == len(loader) == 8 + 8 + listed + 1
    assert good <= set(seen) and not set(seen) & {"train0_001", "train0_003", "train0_005", "nocaption"}
    expected_skips = 3 + 1 + (listed - 4)
    assert dm.skipped_samples == {"train": expected_skips} and dm.tallies["train"].epoch == expected_skips


def test_unsafe_tensor_payloads_are_skipped(tmp_path):
    def extra(shard, index):
        latent = np.full((2, 2, 2), index, dtype=np.float16)
        if index == 2:
            buffer = io.BytesIO()
            np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
            return {"latent.npy": buffer.getvalue()}
        return {"latent.npy": latent}

    write_shards(tmp_path, [6], extra=extra)
    dm = datamodule(tmp_path, image_keys=[], tensor_keys=["latent.npy"], batch_size=5, num_workers=0, shuffle_buffer=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSampleWarning)
        batches = list(dm.train_dataloader())
    assert len(batches) == 1 and "train0_002" not in batches[0]["key"]
    assert dm.skipped_samples == {"train": 1}


# ---------------------------------------------------------------- tokens and tensor shards

def count_tokens(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[len(caption), len(caption.split())] for caption in captions])


class ModuleWithTokenizer(torch.nn.Module):
    def tokenize(self, captions):
        return count_tokens(captions)


def test_tokenizer_hook_adds_tokens_in_the_workers(tmp_path):
    write_shards(tmp_path, [5, 5])
    dm = datamodule(tmp_path, num_workers=2, batch_size=2)
    dm.trainer = SimpleNamespace(current_epoch=0, global_rank=0, world_size=1, callbacks=[],
                                 lightning_module=SimpleNamespace(tokenizer=count_tokens))
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    for batch in batches:
        assert batch["tokens"].dtype == torch.int64 and torch.equal(batch["tokens"], count_tokens(batch["caption"]))
    dm.trainer = None
    assert "tokens" not in next(iter(dm.train_dataloader()))
    dm.set_tokenizer(count_tokens)
    assert "tokens" in next(iter(dm.train_dataloader()))
    with pytest.raises(UserError, match="copy the model"):
        dm.set_tokenizer(ModuleWithTokenizer().tokenize)


def test_latent_shards_flow_through_under_their_base_names(tmp_path):
    def extra(shard, index):
        return {"latent.npy": np.full((4, 2, 2), index, dtype=np.float16), "text_emb.npy": np.ones((3, 5), np.float32)}

    write_shards(tmp_path, [4, 4], extra=extra)
    dm = datamodule(tmp_path, image_keys=[], tensor_keys=["latent.npy", "text_emb.npy"], batch_size=4, num_workers=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    for batch in batches:
        assert "image" not in batch and batch["latent"].shape == (4, 4, 2, 2) and batch["latent"].dtype == torch.float32
        assert batch["text_emb"].shape == (4, 3, 5)
        indices = [int(key.split("_")[1]) for key in batch["key"]]
        assert torch.equal(batch["latent"][:, 0, 0, 0], torch.tensor(indices, dtype=torch.float32))


# ---------------------------------------------------------------- counts, errors, config, state

def test_manifest_counts_are_used_when_current(tmp_path):
    write_shards(tmp_path, [3, 4])
    urls = sorted(str(p) for p in tmp_path.glob("train-*.tar"))
    assert shard_sample_counts(urls, "data.train_urls") == [3, 4]
    shards = [{"name": Path(u).name, "split": "train", "count": 10 + i, "sha256": "x", "bytes": Path(u).stat().st_size}
              for i, u in enumerate(urls)]
    shards[1]["bytes"] += 1  # stale entry: listed instead
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": shards}))
    assert shard_sample_counts(urls, "data.train_urls") == [10, 4]
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest"):
        shard_sample_counts(urls, "data.train_urls")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(batch_size=0), "data.batch_size"),
        (dict(image_size=-8), "data.image_size"),
        (dict(val_batch_size=0), "data.val_batch_size"),
        (dict(num_workers=-1), "data.num_workers"),
        (dict(shuffle_buffer=-5), "data.shuffle_buffer"),
        (dict(mode="resampled"), "data.samples_per_epoch"),
        (dict(samples_per_epoch=100), "data.samples_per_epoch"),
        (dict(tensor_keys=["latent.pkl"]), "data.tensor_keys"),
        (dict(tensor_keys=["image.npy"]), "data.tensor_keys"),
        (dict(image_keys=[]), "data.image_keys"),
        (dict(max_image_pixels=0), "data.max_image_pixels"),
        (dict(train_urls="pipe:cat data/train-000000.tar"), "data.allow_pipe_urls"),
    ],
)
def test_bad_arguments_raise_user_errors_naming_the_key(tmp_path, kwargs, message):
    options = dict(train_urls=str(tmp_path / "train-*.tar"))
    options.update(kwargs)
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        ShardDataModule(**options)


def test_missing_or_empty_shards_raise_user_errors(tmp_path):
    write_shards(tmp_path, [2])
    for urls, match in [(str(tmp_path / "nothing-*.tar"), "no shard matches"),
                        (str(tmp_path / "train-{000000..000001}.tar"), "train-000001.tar.*does not exist"),
                        ([], "is empty")]:
        dm = ShardDataModule(urls, image_size=8, batch_size=2, num_workers=0)
        with pytest.raises(UserError, match=r"data\.train_urls.*" + match):
            dm.setup("fit")
        with pytest.raises(UserError, match="build-emoji"):
            dm.train_dataloader()
    dm = ShardDataModule(str(tmp_path / "train-*.tar"), image_size=8, batch_size=3, num_workers=0)
    with pytest.raises(UserError, match=r"no full batch of 3.*data\.batch_size"):
        dm.train_dataloader()
    piped = ShardDataModule(f"pipe:cat {tmp_path}/train-000000.tar", image_size=8, batch_size=2, num_workers=0,
                            allow_pipe_urls=True, mode="resampled", samples_per_epoch=2)
    assert len(next(iter(piped.train_dataloader()))["key"]) == 2


def test_state_dict_holds_seed_and_epoch(tmp_path):
    write_shards(tmp_path, [6])
    dm = datamodule(tmp_path, num_workers=0)
    dm.load_state_dict({"seed": 7, "epoch": 4})
    assert dm.state_dict()["epoch"] == 4 and dm.state_dict()["seed"] == 7
    loader = dm.train_dataloader()
    assert keys_of(list(loader)) == keys_of(list(loader.dataset.iter_worker(0, 4)))
    torch.save(dm.state_dict(), tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True)["epoch"] == 4


def test_emoji_config_instantiates_through_the_cli_parser():
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    config = yaml.safe_load((REPO / "configs" / "data" / "emoji.yaml").read_text())
    dm = parser.instantiate_classes(parser.parse_object(config)).data
    assert isinstance(dm, ShardDataModule)
    assert dm.train_urls == "data/emoji/train-*.tar" and dm.val_urls == "data/emoji/val-*.tar"
    assert dm.decoder.image_size == 64 and dm.random_flip is False


class TinyModel(__import__("lightning").pytorch.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["image"].mean(dim=(2, 3))).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.layer(batch["image"].mean(dim=(2, 3))).mean(), batch_size=len(batch["key"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_fit_logs_skipped_samples_per_epoch(tmp_path):
    from lightning.pytorch import Trainer

    write_shards(tmp_path / "t", [5, 4], extra=lambda shard, index: {"txt": b"\xff"} if (shard, index) == (1, 1) else {})
    write_shards(tmp_path / "v", [4], prefix="val", extra=lambda shard, index: {"png": b"no"} if index == 0 else {})
    trainer_options = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                           enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                           num_sanity_val_steps=0)
    dm = ShardDataModule(str(tmp_path / "t" / "train-*.tar"), val_urls=str(tmp_path / "v" / "val-*.tar"), image_size=8,
                         batch_size=2, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSampleWarning)
        trainer = Trainer(**trainer_options)
        trainer.fit(TinyModel(), datamodule=dm)
        assert trainer.num_training_batches == 4 and trainer.num_val_batches == [2]
        assert trainer.callback_metrics["data/skipped_samples"] == 1
        assert trainer.callback_metrics["data/skipped_samples_val"] == 1
        assert dm.skipped_samples == {"train": 2, "val": 2} and dm.state_dict()["epoch"] == 2
        no_val = ShardDataModule(str(tmp_path / "t" / "train-*.tar"), image_size=8, batch_size=2, num_workers=0)
        Trainer(**trainer_options).fit(TinyModel(), datamodule=no_val)
    assert no_val.skipped_samples == {"train": 2}
