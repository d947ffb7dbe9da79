"""export --format open_clip: a CLIP checkpoint -> open_clip_config.json + open_clip_model.safetensors that open_clip
alone loads (`create_model_and_transforms('local-dir:DIR')`) with the same image and text features to 1e-5; the
folder also serves as a pretrained `open_clip` text encoder of the denoiser."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from checkpoint_support import save_module
from lightning_diffusion.clip.export_open_clip import export_open_clip
from lightning_diffusion.errors import UserError


@pytest.mark.parametrize("args", [{"model_name": "ld-tiny-vit"},
                                  {"model_name": "ld-tiny-rn", "loss": "siglip", "image_size": 48,
                                   "context_length": 24},
                                  {"model_name": "ld-tiny-rn", "text_tower": "minilm"}])
def test_open_clip_reloads_the_same_features(tmp_path: Path, args: dict) -> None:
    from lightning_diffusion.clip import CLIPModule

    torch.manual_seed(0)
    clip = CLIPModule(**args).eval()
    ckpt = save_module(clip, tmp_path / "clip.ckpt")
    summary = export_open_clip(ckpt, tmp_path / "export")
    assert "features match" in summary
    files = {p.name for p in (tmp_path / "export").iterdir()}
    weights = {"open_clip_config.json", "open_clip_model.safetensors"}
    # a MiniLM text tower brings its Hugging Face tokenizer, which open_clip's local-dir tokenizer reads there
    assert files == weights if args.get("text_tower") != "minilm" else weights | {"tokenizer.json"} <= files, files
    config = json.loads((tmp_path / "export" / "open_clip_config.json").read_text())
    assert set(config) == {"model_cfg", "preprocess_cfg"}

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'export'}")
    size = args.get("image_size", 32)
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    captions = ["a 3D rendered emoji of fox", "a flat vector emoji of red apple", ""]
    tokens = tokenizer(captions)
    assert torch.equal(tokens, clip.tokenizer(captions))
    with torch.no_grad():
        for ours, theirs in ((clip.model.encode_image(images), model.eval().encode_image(images)),
                             (clip.model.encode_text(tokens), model.encode_text(tokens))):
            torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert preprocess.transforms[0].size == size and config["preprocess_cfg"]["size"] in (size, [size, size])
    if args.get("loss") == "siglip":
        assert torch.equal(model.logit_bias, clip.model.logit_bias)


def test_the_export_is_an_open_clip_text_encoder_of_the_denoiser(tmp_path: Path) -> None:
    from lightning_diffusion.clip import CLIPModule, CLIPTextEncoder
    from lightning_diffusion.text_encoders import TextEncoderSpec

    torch.manual_seed(0)
    ckpt = save_module(CLIPModule(model_name="ld-tiny-vit"), tmp_path / "clip.ckpt")
    export_open_clip(ckpt, tmp_path / "export")
    exported = TextEncoderSpec("open_clip", str(tmp_path / "export")).load()
    original = CLIPTextEncoder.from_checkpoint(ckpt)
    tokens = original.tokenizer(["a 3D rendered emoji of fox", ""])
    assert torch.equal(exported.tokenize(["a 3D rendered emoji of fox", ""]), tokens)
    for a, b in zip(exported(tokens), original(tokens)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(exported.token_mask(tokens), original.token_mask(tokens))


def test_not_a_clip_checkpoint_is_named(tmp_path: Path) -> None:
    torch.save({"hyper_parameters": {"objective": "eps"}, "state_dict": {}}, tmp_path / "denoiser.ckpt")
    with pytest.raises(UserError, match=r"denoiser.ckpt' is not a CLIP checkpoint"):
        export_open_clip(tmp_path / "denoiser.ckpt", tmp_path / "out")


def test_the_export_command_dispatches_clip_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lightning_diffusion.cli import main
    from lightning_diffusion.clip import CLIPModule

    torch.manual_seed(0)
    ckpt = save_module(CLIPModule(model_name="ld-tiny-vit"), tmp_path / "clip.ckpt")
    assert main(["export", "--ckpt", str(ckpt), "--format", "open_clip", "--out", str(tmp_path / "exported")]) == 0
    assert "features match" in capsys.readouterr().out
    model = open_clip.create_model(f"local-dir:{tmp_path / 'exported'}")
    assert model.visual.image_size == (32, 32)
    assert main(["export", "--ckpt", str(ckpt), "--format", "folder", "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: a clip checkpoint cannot be exported to --format folder: use --format open_clip"]
    assert not (tmp_path / "other").exists()
