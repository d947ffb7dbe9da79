"""encode-latents: latents equal the frozen VAE-GAN's posterior (mode, or a per-key seeded sample), decode to its
reconstructions, carry captions/labels/metadata, skip corrupt inputs once, and feed the DataModule and the denoiser."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.cli import main
from data_pipelines.datamodule import ShardDataModule
from lightning_diffusion.commands.encode_latents import sample_noise
from data_pipelines.shard_writer import ShardWriter, write_manifest
from denoiser_support import TINY_UNET, trainer, use_toy_text_encoder

SIZE = 16
CAPTIONS = ["a flat vector emoji of koala", "a 3D rendered emoji of red apple", "a flat vector emoji of cat"]


def write_image_shards(folder: Path, count: int = 10, corrupt: int | None = None) -> None:
    """`count` smooth 16 px PNG samples (every other one labelled) in shards of 4; `corrupt` gets bad PNG bytes."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    pixels = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear")
    with ShardWriter(folder, "train", max_samples=4) as writer:
        for i in range(count):
            buffer = io.BytesIO()
            Image.fromarray((pixels[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, "PNG")
            png = b"not a png" if i == corrupt else buffer.getvalue()
            meta = {"label": i % 3} if i % 2 == 0 else {}
            writer.write(f"s{i:03d}", {"png": png, "txt": CAPTIONS[i % 3].encode(), "json": json.dumps(meta).encode()})
    write_manifest(folder, {"dataset": "toy", "shards": writer.shards})


def tiny_vae_checkpoint(path: Path, scale: float = 0.7) -> Path:
    """A random-weight VAE-GAN (f = 2, 4 latent channels) with a measured latent_scale, saved like a fit would."""
    from lightning_diffusion.autoencoder import VAEGAN

    torch.manual_seed(0)
    vae = VAEGAN(image_size=SIZE, channels=8, channel_mults=[1, 2], num_blocks=1, latent_channels=4,
                 mid_attention=False, disc_channels=8, disc_layers=1, val_frechet=False, perceptual="none")
    vae.latent_scale.fill_(scale)
    vae.latent_window[0] = torch.tensor([0.0, 4.0, 4.0], dtype=torch.float64)
    torch.save({"hyper_parameters": dict(vae.hparams), "state_dict": vae.state_dict()}, path)
    return path


def read_all(urls: str, tensor_keys: list[str], image_keys: list[str] | None = None, size: int = SIZE) -> dict:
    """Every sample of the shards, in order, through the shared DataModule (one batch)."""
    from data_pipelines.shard_counts import shard_sample_counts
    from data_pipelines.urls import resolve_shards

    total = sum(shard_sample_counts(resolve_shards(urls, "urls"), "urls"))
    data = ShardDataModule(train_urls=urls, val_urls=urls, image_size=size, batch_size=total, num_workers=0,
                           shuffle_buffer=0, image_keys=image_keys or [], tensor_keys=tensor_keys)
    data.setup("validate")
    return next(iter(data.val_dataloader()))


def encode(tmp_path: Path, out: str, *extra: str) -> Path:
    args = ["encode-latents", "--vae", str(tmp_path / "vae.ckpt"), "--in", str(tmp_path / "images" / "train-*.tar"),
            "--out", str(tmp_path / out), "--num-workers", "0", "--device", "cpu", *extra]
    assert main(args) == 0
    return tmp_path / out


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    write_image_shards(tmp_path / "images")
    tiny_vae_checkpoint(tmp_path / "vae.ckpt")
    return tmp_path


def test_mode_latents_are_the_posterior_mean_and_decode_to_the_reconstruction(inputs: Path) -> None:
    from lightning_diffusion.autoencoder import VAEGAN

    out = encode(inputs, "latents", "--batch-size", "3", "--max-samples-per-shard", "4")
    latents = read_all(str(out / "train-*.tar"), ["latent.npy"])
    images = read_all(str(inputs / "images" / "train-*.tar"), [], ["png"])
    assert latents["key"] == images["key"] == [f"s{i:03d}" for i in range(10)]
    assert latents["caption"] == images["caption"]
    assert latents["label"].tolist() == images["label"].tolist() == [0, -1, 2, -1, 1, -1, 0, -1, 2, -1]
    vae = VAEGAN.load_frozen(inputs / "vae.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(latents["latent"], vae.encode(images["image"]).mode(), rtol=1e-5, atol=1e-5)
        decoded = vae.decode(latents["latent"]).clamp(-1, 1)
        torch.testing.assert_close(decoded, vae.reconstruct(images["image"]), rtol=1e-4, atol=1e-4)
    assert latents["latent"].shape == (10, 4, 8, 8) and latents["latent"].dtype == torch.float32

    manifest = json.loads((out / "manifest.json").read_text())
    options = manifest["options"]["train"]
    vae_sha = hashlib.sha256((inputs / "vae.ckpt").read_bytes()).hexdigest()
    assert options["vae_sha256"] == vae_sha and options["latent_scale"] == pytest.approx(0.7)
    assert options["posterior"] == "mode" and options["latent_shape"] == [4, 8, 8] and options["image_size"] == SIZE
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2] and manifest["counts"]["train"]["total"] == 10
    with open(out / "train-000000.tar", "rb") as handle:
        import tarfile

        with tarfile.open(fileobj=handle) as archive:
            meta = json.loads(archive.extractfile("s000.json").read())
    assert meta == {"vae_sha256": vae_sha, "latent_scale": pytest.approx(0.7), "latent_shift": 0.0, "posterior": "mode",
                    "image_size": SIZE, "label": 0}

    again = encode(inputs, "latents", "--batch-size", "3", "--max-samples-per-shard", "4")
    assert json.loads((again / "manifest.json").read_text()) == manifest  # deterministic, byte-identical shards


def test_sample_latents_are_seeded_per_key_whatever_the_batch_size(inputs: Path) -> None:
    from lightning_diffusion.autoencoder import VAEGAN

    a = read_all(str(encode(inputs, "a", "--sample", "--seed", "3", "--batch-size", "4") / "train-*.tar"), ["latent.npy"])
    b = read_all(str(encode(inputs, "b", "--sample", "--seed", "3", "--batch-size", "7") / "train-*.tar"), ["latent.npy"])
    c = read_all(str(encode(inputs, "c", "--sample", "--seed", "4") / "train-*.tar"), ["latent.npy"])
    torch.testing.assert_close(a["latent"], b["latent"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a["latent"], c["latent"])
    images = read_all(str(inputs / "images" / "train-*.tar"), [], ["png"])
    with torch.no_grad():
        posterior = VAEGAN.load_frozen(inputs / "vae.ckpt").encode(images["image"])
    noise = torch.stack([sample_noise((4, 8, 8), 3, key) for key in a["key"]])
    torch.testing.assert_close(a["latent"], posterior.mean + posterior.std * noise, rtol=1e-5, atol=1e-5)
    assert json.loads((inputs / "a" / "manifest.json").read_text())["options"]["train"]["seed"] == 3


def test_text_embeddings_and_prefixes_share_one_folder(inputs: Path) -> None:
    from lightning_diffusion.clip import CLIPModule, CLIPTextEncoder

    torch.manual_seed(0)
    clip = CLIPModule()
    torch.save({"state_dict": clip.state_dict(), "hyper_parameters": dict(clip.hparams)}, inputs / "clip.ckpt")
    out = encode(inputs, "latents", "--text-encoder", str(inputs / "clip.ckpt"), "--batch-size", "4")
    encode(inputs, "latents", "--prefix", "val")
    batch = read_all(str(out / "train-*.tar"), ["latent.npy", "text_emb.npy", "text_pooled.npy"])
    text = CLIPTextEncoder.from_checkpoint(inputs / "clip.ckpt")
    with torch.no_grad():
        states, pooled = text(text.tokenizer(batch["caption"]))
    torch.testing.assert_close(batch["text_emb"], states, rtol=2e-3, atol=2e-3)  # stored as float16
    torch.testing.assert_close(batch["text_pooled"], pooled, rtol=2e-3, atol=2e-3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(s["name"] for s in manifest["shards"]) == ["train-000000.tar", "val-000000.tar"]
    assert manifest["counts"] == {"train": {"total": 10}, "val": {"total": 10}}
    assert manifest["options"]["train"]["text_encoder_sha256"] == hashlib.sha256(
        (inputs / "clip.ckpt").read_bytes()).hexdigest()
    assert manifest["options"]["val"]["text_encoder_checkpoint"] is None


def test_a_corrupt_input_is_skipped_once_and_not_replaced_by_a_duplicate(tmp_path: Path) -> None:
    write_image_shards(tmp_path / "images", corrupt=5)
    tiny_vae_checkpoint(tmp_path / "vae.ckpt")
    with pytest.warns(UserWarning, match="skipped 1 sample"):
        out = encode(tmp_path, "latents", "--batch-size", "4")
    batch = read_all(str(out / "train-*.tar"), ["latent.npy"])
    assert batch["key"] == [f"s{i:03d}" for i in range(10) if i != 5]
    assert json.loads((out / "manifest.json").read_text())["options"]["train"]["skipped_samples"] == 1


def test_the_denoiser_trains_on_latent_shards(inputs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_diffusion.diffusion.module import Denoiser

    use_toy_text_encoder(monkeypatch)
    out = encode(inputs, "latents")
    model = Denoiser(**{**TINY_UNET, "attention_resolutions": (4,)}, conditioning="text", space="latent",
                     vae_checkpoint=str(inputs / "vae.ckpt"), ema_decay=None)
    urls = str(out / "train-*.tar")
    data = ShardDataModule(train_urls=urls, val_urls=urls, image_size=SIZE, batch_size=4, num_workers=0,
                           image_keys=[], tensor_keys=["latent.npy"])
    seen = []
    original = model.batch_x0
    monkeypatch.setattr(model, "batch_x0", lambda batch, sample=True: seen.append(sorted(batch)) or original(batch, sample))
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    trainer(inputs, max_steps=2, limit_val_batches=1).fit(model, datamodule=data)
    assert seen and all("latent" in keys and "image" not in keys and "tokens" in keys for keys in seen)
    assert any(not torch.equal(before[k], v) for k, v in model.unet.state_dict().items())


def test_user_errors(inputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["encode-latents", "--in", str(inputs / "images" / "train-*.tar"), "--num-workers", "0"]
    assert main([*base, "--vae", str(inputs / "missing.ckpt"), "--out", str(inputs / "o")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    assert main([*base, "--vae", str(inputs / "vae.ckpt"), "--out", str(inputs / "images")]) == 2
    assert "folder of the input shards" in capsys.readouterr().err
    assert main([*base, "--vae", str(inputs / "vae.ckpt"), "--out", str(inputs / "o"), "--image-size", "15"]) == 2
    assert "multiple" in capsys.readouterr().err
    assert main(["encode-latents", "--in", str(inputs / "nothing-*.tar"), "--vae", str(inputs / "vae.ckpt"),
                 "--out", str(inputs / "o")]) == 2
    assert "no shard matches" in capsys.readouterr().err
