"""CLIPModule under Lightning DDP (2 CPU ranks, gloo): training on two half-batches equals training on their
concatenation in one process, and validation metrics are computed on the features of both ranks, also when
the ranks hold different numbers of validation samples."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_diffusion.clip import CLIPModule

THINGS = ["koala", "cat", "rocket", "tree", "heart", "moon", "sun", "apple", "fish", "star", "car", "boat"]
CAPTIONS = [f"a {style} emoji of {thing}" for style in ("flat", "3D rendered") for thing in THINGS]
STEPS, PER_RANK, VAL_SPLIT = 2, 6, (10, 6)


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=32, mode="nearest")


def train_batches(rank: int) -> list[dict]:
    """Step s of rank r: pairs [s * 12 + r * 6, ... + 6) of 24 captions."""
    batches = []
    for step in range(STEPS):
        start = step * 2 * PER_RANK + rank * PER_RANK
        batches.append({"image": _images(24, 0)[start:start + PER_RANK],
                        "caption": CAPTIONS[start:start + PER_RANK], "key": [str(i) for i in range(PER_RANK)]})
    return batches


def val_samples() -> list[tuple[torch.Tensor, str]]:
    images = _images(16, 1)
    return [(images[i], CAPTIONS[i]) for i in range(16)]


def _collate(items: list) -> dict:
    return {"image": torch.stack([i for i, _ in items]), "caption": [c for _, c in items],
            "key": [c for _, c in items]}


class RankSplit(L.LightningDataModule):
    """Each rank its own training batches and an unequal share (10 / 6) of the 16 validation pairs."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(train_batches(self.trainer.global_rank), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        start = sum(VAL_SPLIT[:rank])
        return DataLoader(val_samples()[start:start + VAL_SPLIT[rank]], batch_size=4, collate_fn=_collate)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", precision="32-true", logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                     num_sanity_val_steps=0, **kwargs)


@pytest.mark.slow
def test_two_rank_fit_and_validation_equal_one_rank(tmp_path) -> None:
    torch.manual_seed(0)
    distributed = CLIPModule(warmup_steps=1, lr=5e-4)
    single = CLIPModule(warmup_steps=1, lr=5e-4)
    single.load_state_dict(distributed.state_dict())

    ddp = _trainer(tmp_path / "ddp", strategy="ddp_spawn", devices=2, max_steps=STEPS, use_distributed_sampler=False)
    ddp.fit(distributed, datamodule=RankSplit())  # rank 0's weights and metrics come back to this process

    concatenated = [{key: (torch.cat([a[key], b[key]]) if key == "image" else a[key] + b[key]) for key in a}
                    for a, b in zip(train_batches(0), train_batches(1))]
    one = _trainer(tmp_path / "one", devices=1, max_steps=STEPS, limit_val_batches=0)
    one.fit(single, DataLoader(concatenated, batch_size=None))
    for (name, a), (_, b) in zip(distributed.state_dict().items(), single.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)

    # Validation on all 16 pairs in one process: the numbers rank 0 logged from the gathered features.
    reference = _trainer(tmp_path / "val", devices=1).validate(
        single, DataLoader(val_samples(), batch_size=4, collate_fn=_collate), verbose=False)[0]
    assert ddp.callback_metrics["val/samples"].item() == 16
    for key in ("i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5", "cosine_matched",
                "cosine_unmatched"):
        assert ddp.callback_metrics[f"val/{key}"].item() == pytest.approx(reference[f"val/{key}"], abs=1e-5), key
