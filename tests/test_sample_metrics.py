"""`SampleMetrics`: the Fréchet distance of samples logged during training equals what `evaluate` reports for the
checkpoint with the same sampling settings, and bad settings are refused before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from denoiser_support import TINY_UNET, fixed_batch, loader, one_thread, trainer, use_toy_text_encoder
from lightning_diffusion.cli import main
from lightning_diffusion.diffusion.module import Denoiser
from lightning_diffusion.diffusion.sample_metrics import SampleMetrics
from lightning_diffusion.errors import UserError
from test_metrics_evaluate import tiny_encoder, write_shards  # noqa: F401 - a fixture

OPTIONS = {"guidance": 2.0, "sampler": "ddim", "steps": 3}


def test_logged_frechet_distance_equals_evaluate_on_the_checkpoint(tmp_path: Path, monkeypatch, tiny_encoder) -> None:
    use_toy_text_encoder(monkeypatch)
    shards = write_shards(tmp_path / "shards", count=10)
    callback = SampleMetrics(data=str(shards), num_samples=8, every_n_steps=2, metrics=("fid", "kid"),
                             batch_size=4, cache_dir=str(tmp_path / "cache"), **OPTIONS)
    model = Denoiser(**{**TINY_UNET, "grid_every_n_steps": 100}, conditioning="text", lr=2e-3, ema_decay=0.5)
    batch = fixed_batch(4)
    with one_thread():
        fit = trainer(tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=1, callbacks=[callback])
        fit.fit(model, loader(batch, 4), loader(batch, 1))
    logged = fit.callback_metrics
    assert {"val/fd_tiny@8", "val/kd_tiny@8"} <= set(logged)
    assert callback._last_step == 4 and float(logged["val/fd_tiny@8"]) > 0

    ckpt = tmp_path / "last.ckpt"
    fit.save_checkpoint(ckpt)  # its state_dict holds the EMA weights that validation sampled with
    args = ["evaluate", "--ckpt", str(ckpt), "--data", str(shards), "--metrics", "fid,kid", "--num-samples", "8",
            "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--kid-subset-size", "4", "--device", "cpu",
            "--model-class", "lightning_diffusion.diffusion.module.Denoiser", "--out", str(tmp_path / "eval.json"),
            "--guidance", "2", "--sampler", "ddim", "--steps", "3"]
    with one_thread():
        assert main(args) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["real_statistics_cached"] is True and result["generation"] == OPTIONS
    assert result["metrics"]["fd_tiny@8"] == pytest.approx(float(logged["val/fd_tiny@8"]), rel=1e-5)

    # other sampling settings give other samples, so another number
    with one_thread():
        assert main([*args[:-6], "--guidance", "1", "--steps", "2"]) == 0
    other = json.loads((tmp_path / "eval.json").read_text())["metrics"]["fd_tiny@8"]
    assert other != pytest.approx(result["metrics"]["fd_tiny@8"], rel=1e-6)


def test_bad_settings_are_refused_before_training(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(UserError, match="clip_checkpoint"):
        SampleMetrics(data="x.tar", metrics=("clip_score",))
    with pytest.raises(UserError, match="num_samples"):
        SampleMetrics(data="x.tar", num_samples=1)
    with pytest.raises(UserError, match="unknown"):
        SampleMetrics(data="x.tar", metrics=("fid", "lpips"))
    flow = Denoiser(**TINY_UNET, conditioning="none", objective="flow", val_sampler="euler")
    with pytest.raises(UserError, match="flow objective"):
        SampleMetrics(data="x.tar", metrics=("fid",), sampler="ddim").setup(None, flow, "fit")
    with pytest.raises(UserError, match="guidance"):
        SampleMetrics(data="x.tar", metrics=("fid",), guidance=3.0).setup(None, flow, "fit")


def test_evaluate_refuses_sampling_options_for_a_reconstruction_model(tmp_path: Path, capsys) -> None:
    from test_metrics_evaluate import TinyAutoencoder, save_checkpoint

    shards = write_shards(tmp_path / "shards", count=4)
    ckpt = save_checkpoint(TinyAutoencoder(), tmp_path / "ae.ckpt")
    code = main(["evaluate", "--ckpt", str(ckpt), "--data", str(shards), "--metrics", "psnr", "--num-samples", "4",
                 "--model-class", "test_metrics_evaluate.TinyAutoencoder", "--device", "cpu", "--steps", "10"])
    assert code == 2 and "apply to denoiser checkpoints" in capsys.readouterr().err
