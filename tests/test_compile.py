"""`compile: true` compiles the U-Net, the VAE-GAN's networks and both CLIP towers in place: the same outputs as
eager (tolerance), state_dict keys without `_orig_mod.`, and a fit that checkpoints and resumes. The tests use the
`aot_eager` backend (graph capture + AOT autograd, no generated code), which needs no C++ compiler. Outputs are
compared in training mode with gradients on: the graphs the fit then reuses (each new graph costs seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from denoiser_support import TINY_UNET, fixed_batch, loader
from lightning.pytorch import Trainer
from torch.utils.flop_counter import FlopCounterMode

from lightning_diffusion.autoencoder import VAEGAN
from lightning_diffusion.clip import CLIPModule
from lightning_diffusion.commands.sample import load_denoiser
from lightning_diffusion.diffusion.module import Denoiser
from lightning_diffusion.errors import UserError
from lightning_diffusion.training.throughput import ThroughputMFU

COMPILE = dict(compile=True, compile_backend="aot_eager")
TINY_VAE = dict(image_size=16, channels=16, channel_mults=[1, 2], num_blocks=1, latent_channels=4, disc_channels=8,
                disc_layers=2, perceptual="none", val_frechet=False, image_every_n_steps=0, disc_start=1)


def pair(cls: type, **kwargs: Any) -> tuple[Any, Any]:
    """The same model eager and compiled (same initial weights)."""
    torch.manual_seed(0)
    eager = cls(**kwargs)
    torch.manual_seed(0)
    return eager, cls(**kwargs, **COMPILE)


def fit(model: Any, data: Any, steps: int, tmp_path: Path, ckpt_path: str | None = None,
        callbacks: list[Any] | None = None) -> Trainer:
    trainer = Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False,
                      enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0,
                      num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def assert_plain_keys(eager: Any, compiled: Any) -> None:
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())


@pytest.mark.slow  # graph capture: 10-30 s each on this 2-core machine
def test_denoiser_compiled_matches_eager_and_fits_and_resumes(tmp_path: Path) -> None:
    eager, compiled = pair(Denoiser, conditioning="class", num_classes=4, **TINY_UNET)
    batch = fixed_batch(4)
    x, t = batch["image"], torch.tensor([1, 10, 100, 900])
    with FlopCounterMode(display=False) as eager_flops:
        expected = eager(x, t, eager.make_condition(labels=batch["label"]))
        expected.square().mean().backward()
    got = compiled(x, t, compiled.make_condition(labels=batch["label"]))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert_plain_keys(eager, compiled)
    monitor = ThroughputMFU(peak_flops=1e11, window_size=2)  # counts the compiled graphs' FLOPs on the first batch
    trainer = fit(compiled, loader(batch, 2), 2, tmp_path, callbacks=[monitor])  # EMA on: averaging a compiled U-Net
    assert monitor.flops_per_batch == eager_flops.get_total_flops()
    checkpoint = Path(trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    eager.load_state_dict(state)  # a compiled run's checkpoint loads into an eager model
    assert load_denoiser(checkpoint).unet._compiled_call_impl is None  # `sample` runs eager
    assert fit(compiled, loader(batch, 4), 3, tmp_path, ckpt_path=str(checkpoint)).global_step == 3


@pytest.mark.slow  # graph capture: 10-30 s each on this 2-core machine
def test_vae_gan_compiled_matches_eager_and_trains_through_the_adaptive_weight(tmp_path: Path) -> None:
    eager, compiled = pair(VAEGAN, **TINY_VAE)
    x = fixed_batch(4)["image"]
    for model in (eager, compiled):
        model.train()
    torch.testing.assert_close(compiled.decode(compiled.encode(x).mode()), eager.decode(eager.encode(x).mode()),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.discriminator(x), eager.discriminator(x), rtol=1e-4, atol=1e-5)
    assert_plain_keys(eager, compiled)
    data = torch.utils.data.DataLoader([{"image": image} for image in fixed_batch(8)["image"]], batch_size=4)
    trainer = fit(compiled, data, 2, tmp_path)
    assert compiled.global_step == 2  # step 1 runs the GAN (disc_start 1)
    assert all(torch.isfinite(p).all() for p in compiled.parameters())
    frozen = VAEGAN.load_frozen(trainer.checkpoint_callback.best_model_path)  # e.g. for the denoiser: eager
    assert frozen.encoder._compiled_call_impl is None and compiled.encoder._compiled_call_impl is not None


@pytest.mark.slow  # graph capture: 10-30 s each on this 2-core machine
def test_clip_compiled_towers_match_eager(tmp_path: Path) -> None:
    eager, compiled = pair(CLIPModule, model_name="ld-tiny-vit", image_size=16)
    batch = fixed_batch(4)
    tokens = eager.tokenizer(batch["caption"])
    for got, expected in zip(compiled(batch["image"], tokens), eager(batch["image"], tokens)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert_plain_keys(eager, compiled)
    assert fit(compiled, loader(batch, 1), 1, tmp_path).global_step == 1


@pytest.mark.parametrize(("options", "key"), [({"compile_backend": "fast"}, "model.compile_backend"),
                                              ({"compile_backend": "aot_eager", "compile_mode": "max-autotune"},
                                               "model.compile_mode"),
                                              ({"compile_mode": "fastest"}, "model.compile_mode")])
def test_bad_compile_options_are_user_errors(options: dict[str, str], key: str) -> None:
    with pytest.raises(UserError, match=key):
        VAEGAN(**TINY_VAE, compile=True, **options)
