"""The denoiser on encode-latents shards: stored text states stand in for the text tower (same condition to
float16 rounding, the tower never runs in training), and shards from another VAE-GAN / CLIP are refused before the
first step, with the folder and the fix named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from data_pipelines.datamodule import ShardDataModule
from denoiser_support import TINY_UNET, trainer
from lightning_diffusion.errors import UserError
from test_encode_latents import SIZE, encode, read_all, tiny_vae_checkpoint, write_image_shards

ALL_KEYS = ["latent.npy", "text_emb.npy", "text_pooled.npy"]


def clip_checkpoint(path: Path, seed: int = 0) -> Path:
    from lightning_diffusion.clip import CLIPModule

    torch.manual_seed(seed)
    clip = CLIPModule()
    torch.save({"state_dict": clip.state_dict(), "hyper_parameters": dict(clip.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pre_encoded")
    write_image_shards(root / "images")
    tiny_vae_checkpoint(root / "vae.ckpt")
    clip_checkpoint(root / "clip.ckpt")
    encode(root, "latents", "--text-encoder", str(root / "clip.ckpt"), "--batch-size", "4")
    return root


def denoiser(root: Path, **overrides: Any) -> Any:
    from lightning_diffusion.diffusion.module import Denoiser

    args = {**TINY_UNET, "attention_resolutions": (4,), "conditioning": "text", "text_encoder": "clip",
            "clip_checkpoint": str(root / "clip.ckpt"), "space": "latent", "vae_checkpoint": str(root / "vae.ckpt"),
            "ema_decay": None, **overrides}
    return Denoiser(**args)


def data(root: Path, tensor_keys: list[str], folder: str = "latents") -> ShardDataModule:
    urls = str(root / folder / "train-*.tar")
    return ShardDataModule(train_urls=urls, val_urls=urls, image_size=SIZE, batch_size=4, num_workers=0,
                           image_keys=[], tensor_keys=tensor_keys)


def test_stored_text_gives_the_text_towers_condition(encoded: Path) -> None:
    model = denoiser(encoded)
    batch = read_all(str(encoded / "latents" / "train-*.tar"), ALL_KEYS)
    stored = model.batch_condition(batch)
    live = model.make_condition(batch["caption"])
    assert set(stored) == set(live) == {"context", "context_mask", "pooled"}
    assert torch.equal(stored["context_mask"], live["context_mask"])
    for key in ("context", "pooled"):  # the shards hold float16
        torch.testing.assert_close(stored[key], live[key], rtol=2e-3, atol=2e-3)
        assert stored[key].dtype == torch.float32


def test_fit_on_stored_text_never_runs_the_text_tower(encoded: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = denoiser(encoded)

    def no_forward(*args: Any) -> None:
        raise AssertionError("the text tower ran although the batch carries text_emb")

    monkeypatch.setattr(model._text_encoder.module, "forward", no_forward)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    trainer(tmp_path, max_steps=2).fit(model, datamodule=data(encoded, ALL_KEYS))
    assert any(not torch.equal(before[k], v) for k, v in model.unet.state_dict().items())


def test_other_vae_is_refused(encoded: Path, tmp_path: Path) -> None:
    other = tiny_vae_checkpoint(tmp_path / "other_vae.ckpt", scale=0.5)  # same weights, another file content
    with pytest.raises(UserError, match=r"latents in .*latents were encoded with another autoencoder.*--vae .*other_vae"):
        trainer(tmp_path, max_steps=1).fit(denoiser(encoded, vae_checkpoint=str(other)),
                                           datamodule=data(encoded, ["latent.npy"]))


def test_other_clip_is_refused(encoded: Path, tmp_path: Path) -> None:
    other = clip_checkpoint(tmp_path / "other_clip.ckpt", seed=1)
    with pytest.raises(UserError, match=r"text embeddings in .* come from another CLIP.*--text-encoder .*other_clip"):
        trainer(tmp_path, max_steps=1).fit(denoiser(encoded, clip_checkpoint=str(other)),
                                           datamodule=data(encoded, ALL_KEYS))
    # without the stored text entries the same model trains on the latents (its own tower encodes the captions)
    trainer(tmp_path, max_steps=1).fit(denoiser(encoded, clip_checkpoint=str(other)),
                                       datamodule=data(encoded, ["latent.npy"]))


@pytest.mark.parametrize("case, overrides, keys, message", [
    ("pooled missing", {}, ["latent.npy", "text_emb.npy"], "both text_emb.npy and text_pooled.npy"),
    ("pixel model", {"space": "pixel"}, ["latent.npy"], "latent.npy but model.space is pixel"),
    ("other size", {"image_size": 32}, ["latent.npy"], r"latents in .* are \[4, 8, 8\].*\[4, 16, 16\].*image_size"),
    ("class model", {"conditioning": "class", "num_classes": 4}, ALL_KEYS, "come from a CLIP text tower"),
])
def test_mismatched_settings_are_refused(encoded: Path, tmp_path: Path, case: str, overrides: dict, keys: list,
                                         message: str) -> None:
    with pytest.raises(UserError, match=message):
        trainer(tmp_path, max_steps=1).fit(denoiser(encoded, **overrides), datamodule=data(encoded, keys))


def test_latents_without_text_are_refused_for_stored_text(encoded: Path, tmp_path: Path) -> None:
    encode(encoded, "latents_only", "--batch-size", "4")
    with pytest.raises(UserError, match=r"latents_only holds no stored text embeddings: .*--text-encoder"):
        trainer(tmp_path, max_steps=1).fit(denoiser(encoded), datamodule=data(encoded, ALL_KEYS, "latents_only"))


def test_shards_without_a_record_train_with_a_warning(encoded: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copied"
    shutil.copytree(encoded / "latents", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.pop("options")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    urls = str(copy / "train-*.tar")
    module = ShardDataModule(train_urls=urls, image_size=SIZE, batch_size=4, num_workers=0, image_keys=[],
                             tensor_keys=["latent.npy"])
    with pytest.warns(UserWarning, match="no encode-latents record"):
        trainer(tmp_path, max_steps=1).fit(denoiser(encoded), datamodule=module)
