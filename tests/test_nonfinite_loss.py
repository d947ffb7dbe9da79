"""A NaN/Inf loss in any of the three models: `nonfinite_loss: stop` ends training with one clear error before the
optimiser step and keeps the last good checkpoint; `skip` leaves the weights untouched for that step, counts it
and trains on, and still stops after `max_nonfinite_skips` in a row; ranks decide together under DDP; a checkpoint
is never written from non-finite weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from checkpoint_support import TINY_CLIP, TINY_DENOISER, TINY_VAE
from denoiser_support import fixed_batch, one_thread, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_diffusion.cli import main
from lightning_diffusion.errors import UserError
from lightning_diffusion.training.nonfinite import NonFiniteLossError

STAGES = ("vae", "clip", "denoiser")


def build(stage: str, **options: Any) -> pl.LightningModule:
    torch.manual_seed(0)
    if stage == "vae":
        from lightning_diffusion.autoencoder import VAEGAN

        return VAEGAN(**{**TINY_VAE, "disc_start": 10_000, **options})
    if stage == "clip":
        from lightning_diffusion.clip import CLIPModule

        return CLIPModule(**{**TINY_CLIP, **options})
    from lightning_diffusion.diffusion.module import Denoiser

    return Denoiser(**{**TINY_DENOISER, **options})


def batches(nan_at: set[int], count: int) -> DataLoader:
    """`count` copies of one batch; those at `nan_at` carry a NaN pixel (its loss is NaN in every model)."""
    out = []
    for index in range(count):
        batch = fixed_batch(seed=index)
        if index in nan_at:
            batch["image"][0, 0, 0, 0] = float("nan")
        out.append(batch)
    return DataLoader(out, batch_size=None)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


class StepRecorder(pl.Callback):
    """Weights before and after the batch at `index`."""

    def __init__(self, index: int) -> None:
        self.index, self.before, self.after = index, None, None

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, index: int) -> None:
        if index == self.index:
            self.before = weights(module)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if args[-1] == self.index:
            self.after = weights(module)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    with one_thread():
        yield


@pytest.mark.parametrize("stage", STAGES)
def test_stop_raises_before_the_step_and_keeps_the_last_good_checkpoint(stage: str, tmp_path: Path) -> None:
    model = build(stage)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    fit = trainer(tmp_path, max_steps=5, enable_checkpointing=True, callbacks=[saver])
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* loss at step 2 .*set model.nonfinite_loss: skip"):
        fit.fit(model, batches({2}, 5))
    assert isinstance(NonFiniteLossError("x"), UserError)  # the CLI prints it as one `error:` line
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2  # written after the last good step, not overwritten since
    assert all(value.isfinite().all() for value in last["state_dict"].values() if value.is_floating_point())
    assert all(value.isfinite().all() for value in model.parameters())  # (batch-norm statistics saw the NaN)


@pytest.mark.parametrize("stage", STAGES)
def test_skip_leaves_the_weights_of_that_step_and_trains_on(stage: str, tmp_path: Path) -> None:
    model = build(stage, nonfinite_loss="skip")
    skipped, trained = StepRecorder(1), StepRecorder(2)
    fit = trainer(tmp_path, max_steps=3, callbacks=[skipped, trained])
    with pytest.warns(UserWarning, match="optimiser step skipped"):
        fit.fit(model, batches({1}, 3))
    assert fit.global_step == 3
    for name, value in skipped.before.items():
        torch.testing.assert_close(skipped.after[name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(trained.before[name], trained.after[name]) for name in trained.before)
    assert fit.callback_metrics["train/skipped_nonfinite_steps"].item() == 1


def test_skip_stops_after_max_nonfinite_skips_in_a_row(tmp_path: Path) -> None:
    model = build("denoiser", nonfinite_loss="skip", max_nonfinite_skips=2)
    with pytest.warns(UserWarning), pytest.raises(NonFiniteLossError, match="2 steps in a row skipped"):
        trainer(tmp_path, max_steps=5).fit(model, batches({1, 2}, 5))
    model = build("denoiser", nonfinite_loss="skip", max_nonfinite_skips=2)  # a finite step resets the count
    with pytest.warns(UserWarning):
        trainer(tmp_path, max_steps=5).fit(model, batches({1, 3}, 5))


@pytest.mark.parametrize("stage", STAGES)
def test_a_checkpoint_is_never_written_from_non_finite_weights(stage: str, tmp_path: Path) -> None:
    model = build(stage)
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(model, batches(set(), 1))
    fit.save_checkpoint(tmp_path / "good.ckpt")
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="the checkpoint was not written"):
        fit.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists() and (tmp_path / "good.ckpt").is_file()


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="model.nonfinite_loss"):
        build("denoiser", nonfinite_loss="ignore")
    with pytest.raises(UserError, match="model.max_nonfinite_skips"):
        build("vae", max_nonfinite_skips=0)


class NaNOnRankOne(pl.LightningDataModule):
    """Rank 1's second batch has a NaN pixel; rank 0's batches are all finite."""

    def train_dataloader(self) -> DataLoader:
        return batches({1} if self.trainer.global_rank == 1 else set(), 3)


@pytest.mark.slow
def test_ranks_skip_together_under_ddp(tmp_path: Path) -> None:
    """Rank 0's own loss is finite at step 1, yet it skips with rank 1 (else DDP's reducer would hang)."""
    model = build("denoiser", nonfinite_loss="skip")
    before = weights(model)
    fit = trainer(tmp_path, max_steps=3, strategy="ddp_spawn", devices=2, use_distributed_sampler=False)
    fit.fit(model, datamodule=NaNOnRankOne())  # rank 0's weights and metrics come back to this process
    assert fit.callback_metrics["train/skipped_nonfinite_steps"].item() == 1  # rank 0's own count
    assert any(not torch.equal(before[name], value) for name, value in weights(model).items())  # trained on


def test_the_cli_prints_a_stop_as_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import lightning_diffusion.diffusion.module as module

    monkeypatch.setattr(module.Denoiser, "loss_at", lambda *args, **kwargs: torch.tensor(float("nan")))
    from checkpoint_support import fit_config, write_image_shards

    config = fit_config(tmp_path / "c.yaml", "denoiser", tmp_path / "run", write_image_shards(tmp_path / "shards"))
    assert main(["fit", "--config", str(config)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "non-finite denoiser loss at step 0" in lines[0]
