"""`evaluate` end to end on tiny shards: reconstruction metrics against independent numbers, cached real
statistics on the second run, generation models plugging in through `generate`, and user errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch import LightningModule
from PIL import Image

import lightning_diffusion.metrics.encoders as encoders
from lightning_diffusion.cli import main
from test_metrics import TinyEncoder


class TinyAutoencoder(LightningModule):
    """'Reconstructs' by shrinking towards grey: PSNR and SSIM have closed forms to check against."""

    def __init__(self, image_size: int = 16, shrink: float = 0.75) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.scale = torch.nn.Parameter(torch.tensor(shrink))

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale


class TinyGenerator(LightningModule):
    """Text-conditioned stand-in for the denoiser: seeded noise images, one per caption."""

    kinds = ("text",)

    def __init__(self, image_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[int] = []

    def generate(self, captions: list[str], seed: int = 0, first_index: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed + first_index)
        size = self.hparams.image_size
        return torch.rand(len(captions), 3, size, size, generator=generator) * 2 - 1 + self.bias


def write_shards(directory: Path, count: int, size: int = 16) -> Path:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(directory / "val-000000.tar")) as writer:
        for index in range(count):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
            writer.write({"__key__": f"s{index:03d}", "png": buffer.getvalue(), "txt": f"caption {index}"})
    return directory / "val-000000.tar"


def save_checkpoint(model: LightningModule, path: Path) -> Path:
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


@pytest.fixture
def tiny_encoder(monkeypatch: pytest.MonkeyPatch) -> list[TinyEncoder]:
    """A fast stand-in for the pretrained encoders (Inception runs ~1 image/s on this CPU; it is tested in
    test_metrics.py). Returns the encoders built, to count their calls."""
    built: list[TinyEncoder] = []

    def build(name: str, **kwargs) -> TinyEncoder:
        built.append(TinyEncoder())
        return built[-1]

    monkeypatch.setattr(encoders, "build_encoder", build)
    return built


def evaluate(tmp_path: Path, ckpt: Path, model_class: type, metrics: str, out: str, n: int = 8) -> dict:
    args = ["evaluate", "--ckpt", str(ckpt), "--data", str(tmp_path / "shards" / "val-*.tar"), "--metrics", metrics,
            "--num-samples", str(n), "--model-class", f"{model_class.__module__}.{model_class.__qualname__}",
            "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--kid-subset-size", "4",
            "--out", str(tmp_path / out), "--device", "cpu"]
    assert main(args) == 0
    return json.loads((tmp_path / out).read_text())


def test_evaluate_reconstruction_metrics_and_cached_real_statistics(tmp_path: Path, tiny_encoder, capsys) -> None:
    write_shards(tmp_path / "shards", count=10)
    ckpt = save_checkpoint(TinyAutoencoder(), tmp_path / "ae.ckpt")
    first = evaluate(tmp_path, ckpt, TinyAutoencoder, "fid,kid,psnr,ssim", "first.json")
    printed = capsys.readouterr().out
    assert first["task"] == "reconstruction" and first["encoder"] == "tiny"
    assert set(first["metrics"]) == {"fd_tiny_recon@8", "kd_tiny_recon@8", "psnr@8", "ssim@8"}
    assert "fd_tiny_recon@8" in printed and first["real_statistics_cached"] is False
    assert tiny_encoder[0].calls == 4  # 2 batches of 4 real images, 2 of reconstructions

    # PSNR by hand: the first 8 images x in [0, 1] against (0.75 (2x - 1) + 1) / 2, per image, then averaged
    with wds.WebDataset(str(tmp_path / "shards" / "val-000000.tar"), shardshuffle=False).decode("rgb8") as data:
        real = np.stack([sample["png"] for _, sample in zip(range(8), data)]).astype(np.float64) / 255
    recon = (0.75 * (2 * real - 1) + 1) / 2
    mse = ((real - recon) ** 2).reshape(8, -1).mean(1)
    assert first["metrics"]["psnr@8"] == pytest.approx(np.mean(10 * np.log10(1 / mse)), rel=1e-5)
    assert 0 < first["metrics"]["ssim@8"] < 1 and first["metrics"]["fd_tiny_recon@8"] > 0

    second = evaluate(tmp_path, ckpt, TinyAutoencoder, "fid,kid,psnr,ssim", "second.json")
    assert second["real_statistics_cached"] is True and tiny_encoder[1].calls == 2  # no second real pass
    for key, value in first["metrics"].items():
        assert second["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9)


def test_evaluate_generation_model_plugs_in_through_generate(tmp_path: Path, tiny_encoder) -> None:
    write_shards(tmp_path / "shards", count=10)
    ckpt = save_checkpoint(TinyGenerator(), tmp_path / "gen.ckpt")
    result = evaluate(tmp_path, ckpt, TinyGenerator, "fid", "gen.json", n=8)
    assert result["task"] == "generation" and list(result["metrics"]) == ["fd_tiny@8"]
    assert result["metrics"]["fd_tiny@8"] > 0

    # 10 images in full batches of 4 give 8: the key names the count scored, not the one asked for
    result = evaluate(tmp_path, ckpt, TinyGenerator, "fid", "gen.json", n=12)
    assert list(result["metrics"]) == ["fd_tiny@8"] and result["num_samples"] == 8


def test_evaluate_user_errors(tmp_path: Path, capsys) -> None:
    write_shards(tmp_path / "shards", count=4)
    ckpt = save_checkpoint(TinyAutoencoder(), tmp_path / "ae.ckpt")
    base = ["evaluate", "--ckpt", str(ckpt), "--data", str(tmp_path / "shards" / "*.tar"), "--num-samples", "4",
            "--model-class", f"{TinyAutoencoder.__module__}.TinyAutoencoder", "--device", "cpu"]
    assert main([*base, "--metrics", "clip_score"]) == 2
    assert "do not apply to a reconstruction model" in capsys.readouterr().err
    assert main([*base, "--metrics", "fid", "--encoder", "inception",
                 "--inception-weights", str(tmp_path / "nowhere.pth")]) == 2
    assert "weights-inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
    assert main([*base[:2], str(tmp_path / "missing.ckpt"), *base[3:], "--metrics", "psnr"]) == 2
    assert "missing.ckpt" in capsys.readouterr().err


def test_evaluate_generation_with_the_project_clip(tmp_path: Path) -> None:
    """--encoder clip and clip_score on a (random-weight) checkpoint of the project's CLIP stage."""
    import torch.nn.functional as F

    from lightning_diffusion.clip import CLIPImageEncoder, CLIPModule, CLIPTextEncoder

    write_shards(tmp_path / "shards", count=6)
    torch.manual_seed(0)
    clip = CLIPModule()
    clip_ckpt = tmp_path / "clip.ckpt"
    torch.save({"state_dict": clip.state_dict(), "hyper_parameters": dict(clip.hparams)}, clip_ckpt)
    ckpt = save_checkpoint(TinyGenerator(), tmp_path / "gen.ckpt")
    args = ["evaluate", "--ckpt", str(ckpt), "--data", str(tmp_path / "shards" / "val-*.tar"),
            "--metrics", "fid,clip_score", "--num-samples", "6", "--encoder", "clip", "--clip-ckpt", str(clip_ckpt),
            "--model-class", f"{TinyGenerator.__module__}.TinyGenerator", "--cache-dir", str(tmp_path / "cache"),
            "--batch-size", "3", "--out", str(tmp_path / "clip.json"), "--device", "cpu"]
    assert main(args) == 0
    result = json.loads((tmp_path / "clip.json").read_text())
    assert set(result["metrics"]) == {"fd_clip@6", "clip_score_clip@6"} and result["encoder"] == "clip"

    # the CLIP score by hand: batch i of 3 captions starts at sample index 3 i
    image_tower, text_tower = CLIPImageEncoder.from_checkpoint(clip_ckpt), CLIPTextEncoder.from_checkpoint(clip_ckpt)
    generator, scores = TinyGenerator(), []
    for index in range(2):
        captions = [f"caption {3 * index + j}" for j in range(3)]
        with torch.no_grad():
            image_features = F.normalize(image_tower(generator.generate(captions, first_index=3 * index)), dim=-1)
            text_features = F.normalize(text_tower(text_tower.tokenizer(captions))[1], dim=-1)
        scores.append(100 * (image_features * text_features).sum(-1).clamp(min=0))
    assert result["metrics"]["clip_score_clip@6"] == pytest.approx(float(torch.cat(scores).mean()), rel=1e-5)


def test_evaluate_lpips_uses_the_backbone_file_in_torch_home(tmp_path: Path, capsys) -> None:
    """LPIPS (torchmetrics) on [-1, 1] images with a stand-in AlexNet file where torchvision caches it."""
    import torchvision

    from lightning_diffusion.pretrained.lpips import make_lpips

    write_shards(tmp_path / "shards", count=4, size=32)  # AlexNet needs >= 32 px
    ckpt = save_checkpoint(TinyAutoencoder(image_size=32), tmp_path / "ae.ckpt")
    base = ["evaluate", "--ckpt", str(ckpt), "--data", str(tmp_path / "shards" / "val-*.tar"), "--metrics", "lpips",
            "--num-samples", "4", "--model-class", f"{TinyAutoencoder.__module__}.TinyAutoencoder",
            "--torch-home", str(tmp_path / "torch"), "--device", "cpu", "--out", str(tmp_path / "lpips.json")]
    assert main(base) == 2
    assert "alexnet-owt-7be5be79.pth" in capsys.readouterr().err  # missing backbone: one user error

    torch.manual_seed(0)
    backbone = tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    backbone.parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet().state_dict(), backbone)
    assert main(base) == 0
    value = json.loads((tmp_path / "lpips.json").read_text())["metrics"]["lpips_alex@4"]

    with wds.WebDataset(str(tmp_path / "shards" / "val-000000.tar"), shardshuffle=False).decode("torchrgb") as data:
        real = torch.stack([sample["png"] for sample in data]) * 2 - 1
    lpips = make_lpips("alex", tmp_path / "torch")
    lpips.update((real * 0.75).clamp(-1, 1), real)
    assert value == pytest.approx(float(lpips.compute()), rel=1e-5) and value > 0
