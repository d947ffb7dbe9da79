"""Scale-out correctness: 2 DDP ranks equal 1 process on the global batch (denoiser, VAE-GAN), and the tiny models
train under mixed precision with their metric updates outside autocast.

One spawned 2-rank `strategy="ddp"` world (gloo) fits both the denoiser and the VAE-GAN (see
`scale_out_support.py`: noise and timesteps are seeded per sample key, so a sample gets the same draw on whichever
rank holds it). Metrics across ranks are covered elsewhere: FID/KID in `test_metrics_ddp.py`, CLIP retrieval on
gathered features (and the CLIP fit) in `test_clip_ddp.py`, VAE-GAN latent-scale all-reduce in
`test_autoencoder_ddp.py`.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from denoiser_support import fixed_batch, use_toy_text_encoder
from lightning_diffusion.clip import CLIPModule
from lightning_diffusion.diffusion.module import Denoiser
from scale_out_support import (
    DENOISER, STEPS, TINY_VAE, KeyedNoiseVAEGAN, ddp_worker, denoiser_batches, fit_denoiser, fit_vae, rank_share,
    vae_batches,
)

ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Both ranks' recordings of the denoiser and VAE-GAN fits (one launch for the whole file)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True,
                       start_method="spawn")  # fork after OpenMP use can hang
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_denoiser_two_ranks_equal_one_process(two_ranks: list[dict[str, Any]], tmp_path: Path) -> None:
    ddp = [rank["denoiser"] for rank in two_ranks]
    single = fit_denoiser(denoiser_batches(), tmp_path)
    for step in range(STEPS):
        assert ddp[0]["losses"][step] != ddp[1]["losses"][step]  # the ranks trained on different samples
        assert torch.equal(ddp[0]["grads"][step], ddp[1]["grads"][step])  # all-reduced
        assert float(single["grads"][step].abs().max()) > 1e-3
        print(f"denoiser step {step}: max |grad diff| {max_diff(ddp[0]['grads'][step], single['grads'][step]):.2e}, "
              f"max |param diff| {max_diff(ddp[0]['params'][step], single['params'][step]):.2e}, |loss diff| "
              f"{abs((ddp[0]['losses'][step] + ddp[1]['losses'][step]) / 2 - single['losses'][step]):.2e}")
        torch.testing.assert_close(ddp[0]["grads"][step], single["grads"][step], rtol=0, atol=ATOL)
        torch.testing.assert_close(ddp[0]["params"][step], single["params"][step], rtol=0, atol=ATOL)
        mean_loss = (ddp[0]["losses"][step] + ddp[1]["losses"][step]) / 2
        assert mean_loss == pytest.approx(single["losses"][step], abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_vae_gan_two_ranks_equal_one_process(two_ranks: list[dict[str, Any]], tmp_path: Path) -> None:
    """Step 0 (before disc_start): DDP equals one process on the global batch. Step 1 (GAN on): the adaptive weight
    lambda = ||grad rec|| / ||grad G|| is a per-rank quantity (as in taming/LDM), so the reference is the mean of the
    gradients of two 1-process runs that take step 1 on one rank's half each; the discriminator's loss has no such
    ratio, so its gradient equals the global-batch one too."""
    ddp = [rank["vae"] for rank in two_ranks]
    batches = vae_batches()
    whole = fit_vae(batches, tmp_path / "whole")
    halves = [fit_vae([batches[0], half], tmp_path / f"half{rank}")
              for rank, half in enumerate(rank_share(batches[1:], 0, 2) + rank_share(batches[1:], 1, 2))]
    n_disc = sum(p.numel() for p in KeyedNoiseVAEGAN(**TINY_VAE).discriminator.parameters())
    for step in range(STEPS):
        assert torch.equal(ddp[0]["grads"][step], ddp[1]["grads"][step])  # all-reduced

    step0 = max_diff(ddp[0]["grads"][0], whole["grads"][0])
    print(f"vae step 0: max |grad diff| {step0:.2e}, max |param diff| "
          f"{max_diff(ddp[0]['params'][0], whole['params'][0]):.2e}")
    assert float(whole["grads"][0][:-n_disc].abs().max()) > 1e-3 and not whole["grads"][0][-n_disc:].any()
    torch.testing.assert_close(ddp[0]["grads"][0], whole["grads"][0], rtol=0, atol=ATOL)
    torch.testing.assert_close(ddp[0]["params"][0], whole["params"][0], rtol=0, atol=ATOL)

    per_rank_mean = (halves[0]["grads"][1] + halves[1]["grads"][1]) / 2
    print(f"vae step 1: max |grad diff| vs mean of per-rank halves {max_diff(ddp[0]['grads'][1], per_rank_mean):.2e}, "
          f"disc vs global batch {max_diff(ddp[0]['grads'][1][-n_disc:], whole['grads'][1][-n_disc:]):.2e}, "
          f"autoencoder vs global batch (per-rank lambda) "
          f"{max_diff(ddp[0]['grads'][1][:-n_disc], whole['grads'][1][:-n_disc]):.2e}")
    assert float(whole["grads"][1][-n_disc:].abs().max()) > 1e-3  # the discriminator trains from step 1
    torch.testing.assert_close(ddp[0]["grads"][1], per_rank_mean, rtol=0, atol=ATOL)
    torch.testing.assert_close(ddp[0]["grads"][1][-n_disc:], whole["grads"][1][-n_disc:], rtol=0, atol=ATOL)


# --------------------------------------------------------------------------------------------- mixed precision
def autocast_checked(update: Callable, seen: list[bool]) -> Callable:
    """`update` that records whether CPU autocast was on when it ran."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        seen.append(torch.is_autocast_enabled("cpu"))
        return update(*args, **kwargs)

    return checked


def record_output_dtypes(module: torch.nn.Module, dtypes: list[torch.dtype]) -> None:
    module.register_forward_hook(lambda mod, args, output: dtypes.append(output.dtype))


def bf16_trainer(tmp_path: Path, max_steps: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, precision="bf16-mixed", logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs)


CAPTIONS = ["a flat emoji of koala", "a 3D rendered emoji of cat", "a flat emoji of apple", "a 3D emoji of dog"]


def clip_batch(seed: int) -> dict[str, Any]:
    return {"image": fixed_batch(4, seed)["image"], "caption": CAPTIONS, "key": [str(i) for i in range(4)]}


def tiny_clip(name: str) -> CLIPModule:
    # ld-tiny-rn's ModifiedResNet needs >= 32 px (it downsamples by 32): its module resizes the 16 px inputs
    return CLIPModule(model_name=name, image_size=16 if name == "ld-tiny-vit" else None, context_length=16,
                      warmup_steps=1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["ld-tiny-rn", "ld-tiny-vit"])
def test_clip_bf16_mixed_trains_and_validates_outside_autocast(tmp_path: Path, name: str, monkeypatch) -> None:
    import lightning_diffusion.clip.module as clip_module

    seen: list[bool] = []
    monkeypatch.setattr(clip_module, "retrieval_metrics", autocast_checked(clip_module.retrieval_metrics, seen))
    model = tiny_clip(name)
    dtypes: list[torch.dtype] = []
    record_output_dtypes(model.model.visual, dtypes)
    trainer = bf16_trainer(tmp_path, 3, limit_val_batches=1, val_check_interval=3)
    trainer.fit(model, DataLoader([clip_batch(s) for s in range(3)], batch_size=None),
                DataLoader([clip_batch(9)], batch_size=None))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    assert dtypes == [torch.bfloat16] * 4  # 3 training steps and one validation batch ran under bf16 autocast
    assert seen == [False]  # the retrieval metrics ran once, outside autocast
    assert model.model.logit_scale.dtype == torch.float32


@pytest.mark.timeout(60)
def test_denoiser_bf16_mixed_trains(tmp_path: Path, monkeypatch) -> None:
    use_toy_text_encoder(monkeypatch)
    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    model = Denoiser(**DENOISER)
    before = [p.detach().clone() for p in model.parameters()]
    dtypes: list[torch.dtype] = []
    record_output_dtypes(model.unet, dtypes)
    bf16_trainer(tmp_path, 3, limit_val_batches=0, callbacks=[Losses()]).fit(
        model, DataLoader([fixed_batch(4, s) for s in range(3)], batch_size=None))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert dtypes == [torch.bfloat16] * 3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.timeout(60)
def test_vae_gan_validation_metrics_update_outside_bf16_autocast(tmp_path: Path, monkeypatch) -> None:
    """Training under bf16/16-mixed is covered by test_autoencoder.py; here: its torchmetrics updates."""
    from torchmetrics import MeanMetric
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    seen: list[bool] = []
    for metric in (MeanMetric, PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure):
        monkeypatch.setattr(metric, "update", autocast_checked(metric.update, seen))  # wrapped at construction
    batches = [{"image": batch["image"][:4], "key": batch["key"][:4]} for batch in vae_batches()]
    model = KeyedNoiseVAEGAN(**TINY_VAE)
    dtypes: list[torch.dtype] = []
    record_output_dtypes(model.decoder, dtypes)
    trainer = bf16_trainer(tmp_path, 2, limit_val_batches=1, val_check_interval=2)
    trainer.fit(model, DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None))
    assert dtypes == [torch.bfloat16] * 3  # 2 training steps and the validation batch under bf16 autocast
    assert seen == [False] * 4  # psnr, ssim, kl and rec_l1 of the one validation batch, all outside autocast
    assert all(torch.isfinite(trainer.callback_metrics[f"val/{key}"]) for key in ("psnr", "ssim", "kl"))


def fp16_steps(module: pl.LightningModule, batches: list[dict[str, Any]]) -> tuple[list[float], torch.amp.GradScaler]:
    """The 16-mixed math path by hand (Lightning turns 16-mixed into bf16 on CPU): fp16 autocast forward of the
    module's training_step, GradScaler-scaled backward, unscale + inf check + step, scale update."""
    optimizer = module.configure_optimizers()["optimizer"]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    losses = []
    for index, batch in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = module.training_step(batch, index)
        losses.append(float(loss.detach()))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return losses, scaler


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["denoiser", "ld-tiny-rn", "ld-tiny-vit"])
def test_fp16_autocast_with_grad_scaler_steps(kind: str, monkeypatch) -> None:
    monkeypatch.setattr(pl.LightningModule, "log", lambda *args, **kwargs: None)  # no trainer to log to
    if kind == "denoiser":
        use_toy_text_encoder(monkeypatch)
        torch.manual_seed(0)
        module: pl.LightningModule = Denoiser(**DENOISER)
        batches = [fixed_batch(4, s) for s in range(3)]
    else:
        module = tiny_clip(kind)
        batches = [clip_batch(s) for s in range(3)]
    before = [p.detach().clone() for p in module.parameters()]
    dtypes: list[torch.dtype] = []
    record_output_dtypes(module.unet if kind == "denoiser" else module.model.visual, dtypes)
    losses, scaler = fp16_steps(module, batches)
    assert dtypes == [torch.float16] * 3
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert scaler.get_scale() >= 2.0 ** 9  # at most one skipped (overflowing) step
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
