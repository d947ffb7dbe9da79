"""export --format folder: a denoiser checkpoint -> denoiser.json + denoiser.safetensors that `sample --ckpt DIR`
reads like the Lightning checkpoint (same PNGs for the same seed); a wrong folder is one `error:` line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_support import save_module
from denoiser_support import TINY_UNET, one_thread
from lightning_diffusion.cli import main
from lightning_diffusion.diffusion.export import CONFIG_NAME, WEIGHTS_NAME, export_denoiser
from pretrained_text_support import hf_clip_folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lightning_diffusion.diffusion.module import Denoiser

    root = tmp_path_factory.mktemp("denoiser_export")
    encoder = hf_clip_folder(root / "sd")
    torch.manual_seed(0)
    model = Denoiser(**TINY_UNET, conditioning="text", text_encoder="hf_clip", text_encoder_path=str(encoder),
                     text_layer="penultimate", objective="v", schedule="linear", val_sampler="ddim", ema_decay=None)
    with torch.no_grad():  # stand in for a trained model: the zero-initialised branches carry signal
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    return save_module(model, root / "denoiser.ckpt")


def sample(ckpt: Path, out: Path) -> np.ndarray:
    args = ["sample", "--ckpt", str(ckpt), "--prompt", "a 3D rendered emoji of koala", "--guidance", "3",
            "--steps", "3", "--seed", "5", "--n", "2", "--out", str(out), "--device", "cpu"]
    with one_thread():
        assert main(args) == 0
    return np.asarray(Image.open(out))


def test_the_folder_samples_the_same_images(checkpoint: Path, tmp_path: Path) -> None:
    assert main(["export", "--ckpt", str(checkpoint), "--format", "folder", "--out", str(tmp_path / "export")]) == 0
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((tmp_path / "export" / CONFIG_NAME).read_text())
    hparams = config["hyper_parameters"]
    assert (hparams["objective"], hparams["schedule"], hparams["text_encoder"], hparams["text_layer"]) == \
        ("v", "linear", "hf_clip", "penultimate")
    assert hparams["text_encoder_path"].endswith("sd/text_encoder")
    from_folder = sample(tmp_path / "export", tmp_path / "folder.png")
    from_ckpt = sample(checkpoint, tmp_path / "ckpt.png")
    assert np.array_equal(from_folder, from_ckpt) and from_folder.std() > 0


def test_wrong_folders_are_one_error_line(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    export_denoiser(checkpoint, tmp_path / "export")
    (tmp_path / "export" / WEIGHTS_NAME).unlink()
    (tmp_path / "empty").mkdir()
    config = json.loads((tmp_path / "export" / CONFIG_NAME).read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / WEIGHTS_NAME).write_bytes(b"")
    (tmp_path / "other" / CONFIG_NAME).write_text(json.dumps({**config, "hyper_parameters": {"widgets": 3}}))
    for folder, message in ((tmp_path / "export", f"lacks {WEIGHTS_NAME}: expected a folder written by `export"),
                            (tmp_path / "empty", f"lacks {CONFIG_NAME}"),
                            (tmp_path / "other", "has arguments this Denoiser does not take (widgets)")):
        code = main(["sample", "--ckpt", str(folder), "--prompt", "a fox", "--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "x.png").exists()
