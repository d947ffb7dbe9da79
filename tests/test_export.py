"""`export --format diffusers`: a VAE-GAN becomes an `AutoencoderKL` folder (safetensors) that diffusers' own
`from_pretrained` loads and that encodes and decodes as the VAE-GAN does (1e-5), scaled by its latent_scale;
configurations with no exact equivalent, bad outputs and unknown formats are one-line errors that write nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers_support import images, tiny_autoencoder_kl

from lightning_diffusion.cli import main


def vae_gan_checkpoint(path: Path, scale: float = 0.7, **overrides: object) -> Path:
    """A random kl-f VAE-GAN (f = 2) with random norms and a measured latent_scale, saved like a fit would."""
    from lightning_diffusion.autoencoder import VAEGAN

    torch.manual_seed(0)
    args = dict(image_size=16, channels=32, channel_mults=[1, 2], latent_channels=4, downsample_padding="asymmetric",
                disc_channels=8, disc_layers=1, val_frechet=False, perceptual="none")
    vae = VAEGAN(**{**args, **overrides})
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    vae.latent_scale.fill_(scale)
    vae.latent_window[0] = torch.tensor([0.0, 4.0, 4.0], dtype=torch.float64)
    torch.save({"hyper_parameters": dict(vae.hparams), "state_dict": vae.state_dict()}, path)
    return path


def export(ckpt: Path, out: Path, fmt: str = "diffusers") -> int:
    return main(["export", "--ckpt", str(ckpt), "--format", fmt, "--out", str(out)])


def assert_same_as_diffusers(ckpt: Path, out: Path) -> None:
    from diffusers import AutoencoderKL

    from lightning_diffusion.autoencoder import VAEGAN

    ours = VAEGAN.load_frozen(ckpt)
    theirs = AutoencoderKL.from_pretrained(str(out)).eval()
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert theirs.config.scaling_factor == pytest.approx(float(ours.latent_scale)) and theirs.config.shift_factor is None
    x = images(2, 16)
    with torch.no_grad():
        posterior = theirs.encode(x).latent_dist
        latents = ours.scale_latents(ours.encode(x).mode())
        torch.testing.assert_close(latents, posterior.mean * theirs.config.scaling_factor, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.encode(x).logvar, posterior.logvar, rtol=0, atol=1e-5)
        z = posterior.mean
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=0, atol=1e-5)


@pytest.mark.parametrize("network", [
    dict(num_blocks=1),  # the decoder gets one identity block per level (diffusers has encoder depth + 1)
    dict(num_blocks=2, decoder_num_blocks=3),  # LDM's kl-f depths: a one-to-one copy
    dict(num_blocks=1, decoder_num_blocks=3, mid_attention=False),  # the encoder gets the identity block
])
def test_a_kl_f_vae_gan_exports_to_an_autoencoder_kl_that_matches_it(tmp_path: Path, network: dict) -> None:
    ckpt = vae_gan_checkpoint(tmp_path / "vae.ckpt", **network)
    assert export(ckpt, tmp_path / "out") == 0
    assert_same_as_diffusers(ckpt, tmp_path / "out")


def test_a_fine_tuned_pretrained_vae_gan_exports_its_own_weights(tmp_path: Path) -> None:
    from lightning_diffusion.autoencoder import VAEGAN

    tiny_autoencoder_kl(tmp_path / "sd", shift_factor=0.2)
    torch.manual_seed(1)
    vae = VAEGAN(image_size=16, pretrained=str(tmp_path / "sd"), perceptual="none", disc_channels=8, disc_layers=1,
                 val_frechet=False)
    with torch.no_grad():  # stands in for fine-tuning: the exported weights must be these, not the folder's
        for parameter in vae.decoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    vae.latent_scale.fill_(0.3)
    vae.latent_window[0] = torch.tensor([0.0, 4.0, 4.0], dtype=torch.float64)
    torch.save({"hyper_parameters": dict(vae.hparams), "state_dict": vae.state_dict()}, tmp_path / "tuned.ckpt")
    assert export(tmp_path / "tuned.ckpt", tmp_path / "out") == 0
    assert_same_as_diffusers(tmp_path / "tuned.ckpt", tmp_path / "out")


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(downsample_padding="symmetric"), "model.downsample_padding: asymmetric"),
    (dict(decoder_channels=64), "model.decoder_channels 64"),
    (dict(channels=16), "model.channels a multiple of 32"),
])
def test_a_configuration_without_an_exact_equivalent_is_refused(tmp_path: Path, overrides: dict, message: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = vae_gan_checkpoint(tmp_path / "vae.ckpt", **overrides)
    assert export(ckpt, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert sorted(os.listdir(tmp_path)) == ["vae.ckpt"]


def test_bad_arguments_are_one_line_errors_that_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = vae_gan_checkpoint(tmp_path / "vae.ckpt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    torch.save({"hyper_parameters": {"lr": 0.1}, "state_dict": {}}, tmp_path / "other.ckpt")
    cases = [
        ((ckpt, tmp_path / "full"), "exists and is not an empty folder"),
        ((ckpt, tmp_path / "out", "onnx"), "unknown --format 'onnx': use one of"),
        ((tmp_path / "missing.ckpt", tmp_path / "out"), "missing.ckpt"),
        ((tmp_path / "other.ckpt", tmp_path / "out"), "is not a checkpoint of a model this command exports"),
    ]
    for args, message in cases:
        code = export(*args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["full", "other.ckpt", "vae.ckpt"]
    assert os.listdir(tmp_path / "full") == ["keep.txt"]


def test_a_failing_exporter_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_diffusion.autoencoder import diffusers_export

    ckpt = vae_gan_checkpoint(tmp_path / "vae.ckpt")

    def half_written(ckpt: Path, out: Path) -> str:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(diffusers_export, "export_vae_gan", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        export(ckpt, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["vae.ckpt"]


def test_an_unsafe_checkpoint_is_refused_before_export(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default would unpickle everything

    class RunsCode:
        def __reduce__(self) -> tuple:
            return os.system, (f"touch {tmp_path / 'marker'}",)

    torch.save({"hyper_parameters": {"disc_start": RunsCode()}, "state_dict": {}}, tmp_path / "evil.ckpt")
    assert export(tmp_path / "evil.ckpt", tmp_path / "out") == 2
    assert "was refused" in capsys.readouterr().err and not (tmp_path / "marker").exists()


def test_export_autoencoder_resaves_a_bin_folder_as_safetensors_and_converts_a_vae_gan(tmp_path: Path) -> None:
    """The helper a denoiser export uses for its `vae/` part, whatever the denoiser's autoencoder is."""
    from diffusers import AutoencoderKL

    from lightning_diffusion.autoencoder.diffusers_export import export_autoencoder

    reference = tiny_autoencoder_kl(tmp_path / "sd", shift_factor=0.1, safe=False)
    export_autoencoder(tmp_path / "sd", tmp_path / "copy")
    assert sorted(os.listdir(tmp_path / "copy")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    copy = AutoencoderKL.from_pretrained(str(tmp_path / "copy")).eval()
    assert copy.config.shift_factor == pytest.approx(0.1)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(copy.encode(x).latent_dist.mean, reference.encode(x).latent_dist.mean,
                                   rtol=0, atol=0)
    ckpt = vae_gan_checkpoint(tmp_path / "vae.ckpt")
    export_autoencoder(ckpt, tmp_path / "converted")
    assert_same_as_diffusers(ckpt, tmp_path / "converted")
