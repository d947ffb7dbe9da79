"""Diffusers AutoencoderKL folders as the latent space (frozen) and as the start of a VAE-GAN fine-tune, offline:
latents equal diffusers' own `(mean - shift) * scaling_factor`, a denoiser trains in them, encode-latents stores and
fingerprints them, pickled `.bin` weights go through the weights-only rule, broken folders are one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from denoiser_support import TINY_UNET, fixed_batch, loader, trainer
from diffusers_support import images, tiny_autoencoder_kl

from lightning_diffusion.autoencoder.frozen_autoencoder import (
    FrozenAutoencoder, autoencoder_sha256, load_frozen_autoencoder,
)
from lightning_diffusion.cli import main
from lightning_diffusion.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shift", [None, 0.1])
def test_frozen_latents_and_decodings_equal_diffusers(tmp_path: Path, shift: float | None) -> None:
    reference = tiny_autoencoder_kl(tmp_path / "vae", scaling_factor=0.5, shift_factor=shift)
    vae = load_frozen_autoencoder(tmp_path / "vae")
    assert isinstance(vae, FrozenAutoencoder)
    assert (vae.downsampling_factor, vae.default_image_size, float(vae.latent_scale)) == (2, 16, 0.5)
    assert not any(p.requires_grad for p in vae.parameters())
    x = images()
    with torch.no_grad():
        posterior = reference.encode(x).latent_dist
        expected = (posterior.mean - (shift or 0.0)) * 0.5
        latents = vae.scale_latents(vae.encode(x).mode())
        torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(vae.encode(x).std, posterior.std, rtol=0, atol=1e-5)
        decoded = vae.decode(vae.unscale_latents(latents))
        torch.testing.assert_close(decoded, reference.decode(posterior.mean).sample, rtol=0, atol=1e-5)


def test_bin_weights_load_weights_only_and_a_code_running_pickle_is_refused(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default would unpickle everything
    reference = tiny_autoencoder_kl(tmp_path / "vae", safe=False)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.bin").is_file()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(load_frozen_autoencoder(tmp_path / "vae").encode(x).mean,
                                   reference.encode(x).latent_dist.mean, rtol=0, atol=1e-5)

    class RunsCode:
        def __reduce__(self) -> tuple:
            return os.system, (f"touch {tmp_path / 'marker'}",)

    torch.save({"encoder.conv_in.weight": RunsCode()}, tmp_path / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match=r"diffusion_pytorch_model.bin' \(model.vae_checkpoint\) was refused"):
        load_frozen_autoencoder(tmp_path / "vae")
    assert not (tmp_path / "marker").exists()


def _broken(folder: Path, case: str) -> None:
    if case == "missing":
        return
    tiny_autoencoder_kl(folder)
    if case == "no config":
        (folder / "config.json").unlink()
    elif case == "no weights":
        (folder / "diffusion_pytorch_model.safetensors").unlink()
    elif case in ("other class", "other shapes", "not json"):
        config = json.loads((folder / "config.json").read_text())
        config.update({"other class": {"_class_name": "UNet2DModel"},
                       "other shapes": {"block_out_channels": [16, 32]}}.get(case, {}))
        (folder / "config.json").write_text("{oops" if case == "not json" else json.dumps(config))


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "does not exist: check the path, train that stage first (a VAE-GAN .ckpt) or give a diffusers "
                "AutoencoderKL folder"),
    ("no config", "has no config.json: expected a diffusers AutoencoderKL folder (config.json + "
                  "diffusion_pytorch_model.safetensors"),
    ("no weights", "has no diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin: expected"),
    ("other class", "describes 'UNet2DModel', not 'AutoencoderKL'"),
    ("not json", "is not readable JSON"),
    ("other shapes", "could not be loaded as AutoencoderKL"),
])
def test_a_broken_folder_is_one_line_naming_it_and_exit_2(tmp_path: Path, case: str, message: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from checkpoint_support import write_image_shards

    folder = tmp_path / "vae"
    _broken(folder, case)
    code = main(["encode-latents", "--vae", str(folder), "--in", write_image_shards(tmp_path / "images", count=2),
                 "--out", str(tmp_path / "out"), "--num-workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --vae") and str(folder) in err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_a_denoiser_trains_and_samples_in_the_latent_space_of_a_diffusers_vae(tmp_path: Path) -> None:
    from lightning_diffusion.diffusion.module import Denoiser

    reference = tiny_autoencoder_kl(tmp_path / "vae", scaling_factor=0.5, shift_factor=0.1)
    model = Denoiser(**{**TINY_UNET, "attention_resolutions": (4,)}, conditioning="none", space="latent",
                     vae_checkpoint=str(tmp_path / "vae"), ema_decay=None)
    assert model.sample_shape == (4, 8, 8)
    batch = fixed_batch(4)
    with torch.no_grad():
        expected = (reference.encode(batch["image"]).latent_dist.mean - 0.1) * 0.5
    torch.testing.assert_close(model.batch_x0(batch, sample=False), expected, rtol=0, atol=1e-5)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(model, loader(batch, 2))
    assert any(not torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    assert not any(name.startswith("_vae") for name in model.state_dict())  # the frozen VAE stays outside
    samples = model.eval().generate(num_samples=2, steps=2)
    assert samples.shape == (2, 3, 16, 16) and samples.abs().max() <= 1
    fit.save_checkpoint(tmp_path / "denoiser.ckpt")  # `sample` rebuilds it, the folder as its frozen VAE
    assert main(["sample", "--ckpt", str(tmp_path / "denoiser.ckpt"), "--n", "2", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid" / "row00_001.png").is_file()


def test_encode_latents_stores_latents_of_a_folder_and_records_its_hash(tmp_path: Path) -> None:
    from test_encode_latents import read_all, write_image_shards

    from lightning_diffusion.diffusion.pre_encoded import check_pre_encoded

    write_image_shards(tmp_path / "images", count=5)
    reference = tiny_autoencoder_kl(tmp_path / "vae", scaling_factor=0.5, shift_factor=0.1)
    assert main(["encode-latents", "--vae", str(tmp_path / "vae"), "--in", str(tmp_path / "images" / "train-*.tar"),
                 "--out", str(tmp_path / "latents"), "--num-workers", "0", "--device", "cpu"]) == 0
    stored = read_all(str(tmp_path / "latents" / "train-*.tar"), ["latent.npy"])
    pixels = read_all(str(tmp_path / "images" / "train-*.tar"), [], ["png"])
    with torch.no_grad():
        torch.testing.assert_close(stored["latent"], reference.encode(pixels["image"]).latent_dist.mean,
                                   rtol=0, atol=1e-5)  # unscaled, like a VAE-GAN's
    options = json.loads((tmp_path / "latents" / "manifest.json").read_text())["options"]["train"]
    assert options["vae_sha256"] == autoencoder_sha256(tmp_path / "vae")
    assert (options["latent_scale"], options["latent_shift"], options["latent_shape"]) == (0.5, pytest.approx(0.1),
                                                                                           [4, 8, 8])
    urls = [str(p) for p in sorted((tmp_path / "latents").glob("train-*.tar"))]
    check = dict(latent_shape=(4, 8, 8), text_encoder=None, sha256=autoencoder_sha256)
    check_pre_encoded(urls, ["latent.npy"], vae_checkpoint=str(tmp_path / "vae"), **check)
    tiny_autoencoder_kl(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="encoded with another autoencoder"):
        check_pre_encoded(urls, ["latent.npy"], vae_checkpoint=str(tmp_path / "other"), **check)


def test_the_folder_hash_covers_config_and_weights(tmp_path: Path) -> None:
    tiny_autoencoder_kl(tmp_path / "vae")
    first = autoencoder_sha256(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.25}))
    second = autoencoder_sha256(tmp_path / "vae")
    tiny_autoencoder_kl(tmp_path / "vae", seed=1)
    assert len({first, second, autoencoder_sha256(tmp_path / "vae")}) == 3


def test_the_vae_gan_fine_tunes_a_pretrained_folder_and_reloads_without_it(tmp_path: Path) -> None:
    from lightning_diffusion.autoencoder import VAEGAN

    reference = tiny_autoencoder_kl(tmp_path / "vae")
    model = VAEGAN(image_size=16, pretrained=str(tmp_path / "vae"), perceptual="none", disc_start=0,
                   disc_channels=8, disc_layers=1, val_frechet=False, latent_scale_batches=2)
    x = images(4)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x).mean, reference.encode(x).latent_dist.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.decode(model.encode(x).mean),
                                   reference.decode(reference.encode(x).latent_dist.mean).sample, rtol=0, atol=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(model, loader({"image": x}, 2))
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert {"encoder", "decoder", "discriminator"} <= changed and model.latent_scale_measured
    fit.save_checkpoint(tmp_path / "tuned.ckpt")
    shutil.rmtree(tmp_path / "vae")
    reloaded = VAEGAN.load_frozen(tmp_path / "tuned.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.reconstruct(x), model.eval().reconstruct(x), rtol=0, atol=1e-6)
    assert float(reloaded.latent_scale) == float(model.latent_scale)


def test_a_decoder_only_fine_tune_keeps_the_latent_space_and_its_scale(tmp_path: Path) -> None:
    """`train_encoder: false`: the encoder and the folder's scaling_factor/shift_factor stay, so the export is a
    drop-in replacement: the same scaled latents as the original folder, a changed decoder."""
    from lightning_diffusion.autoencoder import VAEGAN

    tiny_autoencoder_kl(tmp_path / "vae", scaling_factor=0.5, shift_factor=0.1)
    model = VAEGAN(image_size=16, pretrained=str(tmp_path / "vae"), train_encoder=False, perceptual="none",
                   disc_start=0, disc_channels=8, disc_layers=1, val_frechet=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(model, loader({"image": images(4)}, 2))
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert "decoder" in changed and "encoder" not in changed
    assert (float(model.latent_scale), model.latent_shift) == (0.5, pytest.approx(0.1))
    fit.save_checkpoint(tmp_path / "tuned.ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "tuned.ckpt"), "--format", "diffusers", "--out",
                 str(tmp_path / "out")]) == 0
    original, exported = load_frozen_autoencoder(tmp_path / "vae"), load_frozen_autoencoder(tmp_path / "out")
    x = images()
    with torch.no_grad():
        latents = original.scale_latents(original.encode(x).mode())
        torch.testing.assert_close(exported.scale_latents(exported.encode(x).mode()), latents, rtol=0, atol=1e-6)
        assert not torch.allclose(exported.decode(original.unscale_latents(latents)),
                                  original.decode(original.unscale_latents(latents)), atol=1e-4)


def test_the_fine_tune_config_trains_on_cpu_with_a_tiny_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/vae_gan/finetune_sd_vae.yaml through LightningCLI, with its GPU sizes swapped for tiny CPU ones."""
    import yaml
    from checkpoint_support import write_image_shards

    from lightning_diffusion.autoencoder import VAEGAN

    config = yaml.safe_load((REPO / "configs" / "vae_gan" / "finetune_sd_vae.yaml").read_text())
    assert config["model"]["init_args"]["pretrained"] == "pretrained/sd-vae-ft-ema"
    monkeypatch.chdir(tmp_path)
    tiny_autoencoder_kl(tmp_path / "pretrained" / "sd-vae-ft-ema")
    config["trainer"] = {"max_steps": 2, "accelerator": "cpu", "devices": 1, "precision": "32-true",
                         "default_root_dir": "run", "limit_val_batches": 0, "num_sanity_val_steps": 0,
                         "enable_progress_bar": False, "enable_model_summary": False,
                         "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "run"}}}
    config["model"]["init_args"].update(image_size=16, perceptual="none", val_frechet=False, disc_channels=8,
                                        disc_layers=1)
    config["data"]["init_args"] = {"train_urls": write_image_shards(tmp_path / "shards"), "image_size": 16,
                                   "batch_size": 4, "num_workers": 0, "shuffle_buffer": 0}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "config.yaml")]) == 0
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    shutil.rmtree(tmp_path / "pretrained")
    reloaded = VAEGAN.load_frozen(checkpoint)
    assert reloaded.hparams.pretrained_config["block_out_channels"] == [8, 16] and reloaded.latent_scale_measured


def test_a_safetensors_folder_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A safetensors folder never unpickles: torch.load is not called."""
    tiny_autoencoder_kl(tmp_path / "vae")

    def no_pickles(*args: object, **kwargs: object) -> None:
        raise pickle.UnpicklingError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_pickles)
    load_frozen_autoencoder(tmp_path / "vae")


def test_evaluate_scores_the_reconstructions_of_a_folder(tmp_path: Path) -> None:
    from checkpoint_support import write_image_shards
    from test_encode_latents import read_all

    reference = tiny_autoencoder_kl(tmp_path / "vae")
    shards = write_image_shards(tmp_path / "shards", count=4)
    assert main(["evaluate", "--ckpt", str(tmp_path / "vae"), "--data", shards, "--metrics", "psnr,ssim",
                 "--num-samples", "4", "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["task"] == "reconstruction" and result["image_size"] == 16  # the folder's sample_size
    x = read_all(shards, [], ["png"])["image"]
    with torch.no_grad():
        reconstruction = reference.decode(reference.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((x - reconstruction) / 2).pow(2).flatten(1).mean(1).double()
    assert result["metrics"]["psnr@4"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-4)


def test_a_bad_pretrained_folder_is_a_user_error_naming_model_pretrained(tmp_path: Path) -> None:
    from lightning_diffusion.autoencoder import VAEGAN

    with pytest.raises(UserError, match=r"model.pretrained '.*missing' is not a folder: expected a diffusers"):
        VAEGAN(image_size=16, pretrained=str(tmp_path / "missing"), perceptual="none")
    tiny_autoencoder_kl(tmp_path / "vae")
    with pytest.raises(UserError, match="model.in_channels 1 differs from the 3 of model.pretrained"):
        VAEGAN(image_size=16, in_channels=1, pretrained=str(tmp_path / "vae"), perceptual="none")
    with pytest.raises(UserError, match="model.image_size 15 is not divisible by the downsampling factor 2"):
        VAEGAN(image_size=15, pretrained=str(tmp_path / "vae"), perceptual="none")


@pytest.mark.parametrize(("base", "overlay"), [("latent_text_tiny", "sd_vae_tiny"), ("ldm_base", "sd_vae_base")])
def test_the_sd_vae_overlays_change_only_the_vae_and_the_run_folder(base: str, overlay: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Merged with its base, an overlay names the folder and moves every output to its own run folder; its callbacks
    are the base's otherwise (so the overlay follows its base)."""
    import yaml

    folder = REPO / "configs" / "denoiser"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(folder / f"{base}.yaml"), "--config", str(folder / f"{overlay}.yaml"),
              "--print_config"])
    assert exit_info.value.code in (0, None)
    merged = yaml.safe_load(capsys.readouterr().out)
    original = yaml.safe_load((folder / f"{base}.yaml").read_text())
    assert merged["model"]["init_args"]["vae_checkpoint"] == "pretrained/sd-vae-ft-ema"
    root = merged["trainer"]["default_root_dir"]
    assert root == f"runs/denoiser_{overlay}" != original["trainer"]["default_root_dir"]
    callbacks = merged["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == [c["class_path"] for c in original["trainer"]["callbacks"]]
    for mine, theirs in zip(callbacks, original["trainer"]["callbacks"]):
        args = {k: v for k, v in (theirs.get("init_args") or {}).items() if k != "dirpath"}
        assert {k: mine["init_args"][k] for k in args} == args
        if "dirpath" in mine["init_args"] and mine["init_args"]["dirpath"]:
            assert mine["init_args"]["dirpath"].startswith(root + "/")


def test_without_diffusers_a_folder_is_one_line_naming_the_package(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    tiny_autoencoder_kl(tmp_path / "vae")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(UserError, match=r"diffusers is not installed .*pip install 'diffusers>=0.42,<0.43'"):
        load_frozen_autoencoder(tmp_path / "vae")
