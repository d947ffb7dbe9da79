"""The noisy-image classifier and classifier guidance end to end: labels derived by the data pipeline, training,
per-t validation accuracy, guided sampling through `sample --classifier`, and one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from denoiser_support import TINY_UNET, loader, one_thread, trainer, use_toy_text_encoder
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from data_pipelines import ShardDataModule
from data_pipelines.decoding import CorruptSample, SampleDecoder
from data_pipelines.stream import SkippedSampleWarning
from lightning_diffusion.classifier.guidance import guidance_wrapper
from lightning_diffusion.classifier.module import NoisyClassifier
from lightning_diffusion.cli import main
from lightning_diffusion.diffusion.module import Denoiser
from lightning_diffusion.errors import UserError
from test_datamodule import png_bytes, write_shards

TINY_CLASSIFIER = dict(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(8,), num_heads=2, num_timesteps=100, lr=3e-3)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def bright_dark_batch(batch_size: int = 16, seed: int = 0) -> dict:
    """Label 0: dark images, label 1: bright ones (a task the mean pixel decides, so a few steps learn it)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch_size) % 2
    base = torch.where(labels[:, None, None, None] == 1, 0.5, -0.5)
    image = (base + 0.3 * torch.randn(batch_size, 3, 16, 16, generator=generator)).clamp(-1, 1)
    return {"image": image, "label": labels, "caption": [""] * batch_size, "key": [str(i) for i in range(batch_size)]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A classifier trained on the bright/dark task, and a tiny unconditional eps denoiser on the same schedule."""
    folder = tmp_path_factory.mktemp("guidance")
    with one_thread():
        torch.manual_seed(0)
        classifier = NoisyClassifier(**TINY_CLASSIFIER)
        saver = ModelCheckpoint(dirpath=folder / "classifier", save_last=True, every_n_train_steps=40)
        trainer(folder, max_steps=40, enable_checkpointing=True, callbacks=[saver]).fit(
            classifier, loader(bright_dark_batch(), 40))
        torch.manual_seed(0)
        denoiser = Denoiser(**{**TINY_UNET, "num_timesteps": 100, "conditioning": "none", "ema_decay": None})
        with torch.no_grad():  # stand in for a trained model: the zero-initialised branches carry signal
            for parameter in denoiser.parameters():
                if not parameter.any():
                    parameter.normal_(0.0, 0.05)
        saver = ModelCheckpoint(dirpath=folder / "denoiser", save_last=True, every_n_train_steps=1)
        trainer(folder, max_steps=1, enable_checkpointing=True, callbacks=[saver]).fit(
            denoiser, loader(bright_dark_batch(), 1))
    return {"classifier": folder / "classifier" / "last.ckpt", "denoiser": folder / "denoiser" / "last.ckpt"}


def test_the_network_reads_the_time_and_gives_one_logit_per_class() -> None:
    torch.manual_seed(0)
    model = NoisyClassifier(**{**TINY_CLASSIFIER, "num_classes": 3})
    for parameter in model.parameters():  # undo the zero initialisation so the time embedding reaches the logits
        if not parameter.any():
            torch.nn.init.normal_(parameter, std=0.1)
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    logits = model(x, torch.tensor([3, 90]))
    assert logits.shape == (2, 3) and not torch.allclose(logits[0], logits[1])


def test_classifier_learns_and_is_accurate_at_low_noise_only(trained: dict[str, Path]) -> None:
    classifier = NoisyClassifier.load_frozen(trained["classifier"])
    assert not any(p.requires_grad for p in classifier.parameters())
    batch = bright_dark_batch(64, seed=1)
    accuracy = {}
    for t in (0, 99):
        generator = torch.Generator().manual_seed(2)
        x_t = classifier.noised(batch["image"], torch.full((64,), t), generator)
        accuracy[t] = (classifier(x_t, torch.full((64,), t)).argmax(-1) == batch["label"]).float().mean().item()
    assert accuracy[0] > 0.95, accuracy  # clean images: the mean pixel decides
    assert accuracy[99] < 0.8, accuracy  # at the cosine schedule's last step almost no signal is left
    assert classifier.buckets() == [(0, 20), (20, 40), (40, 60), (60, 80), (80, 100)]


def test_validation_logs_accuracy_per_bucket_of_t(tmp_path: Path) -> None:
    model = NoisyClassifier(**TINY_CLASSIFIER, val_buckets=2)
    run = trainer(tmp_path, max_steps=1, limit_val_batches=1)
    run.validate(model, loader(bright_dark_batch(), 1), verbose=False)
    assert {"val/acc_t0-50", "val/acc_t50-100", "val/acc", "val/loss"} <= set(run.callback_metrics)


def test_guidance_shifts_eps_by_the_classifier_gradient(trained: dict[str, Path]) -> None:
    """``eps~ - eps = -s sqrt(1 - abar_t) grad_x log p(y | x_t)`` with the gradient taken here by autograd, and a
    small step along it raises the label's log-probability."""
    classifier = NoisyClassifier.load_frozen(trained["classifier"])
    denoiser = Denoiser(**{**TINY_UNET, "num_timesteps": 100, "conditioning": "none"}).eval()
    labels = torch.ones(8, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    x_t = denoiser.schedule.add_noise(torch.full((8, 3, 16, 16), -0.5), torch.randn(8, 3, 16, 16, generator=generator),
                                      30)
    t = torch.full((8,), 30)
    x = x_t.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(classifier.log_prob(x, t, labels).sum(), x)
    plain = denoiser(x_t, t, {})
    guided = guidance_wrapper(denoiser, classifier, labels, 3.0)(lambda x_, t_: denoiser(x_, t_, {}))(x_t, t)
    noise = denoiser.schedule.signal_noise(t, x_t)[1]
    torch.testing.assert_close(guided - plain, -3.0 * noise * grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        before = classifier.log_prob(x_t, t, labels).mean()
        after = classifier.log_prob(x_t + 0.05 * grad / grad.flatten(1).norm(dim=1)[:, None, None, None], t, labels)
    assert after.mean() > before


def test_sample_command_guides_an_unconditional_denoiser(trained: dict[str, Path], tmp_path: Path) -> None:
    """Rows for labels 0 and 1 from the same seeds: unguided (s = 0) they are the same images, half of them
    classified as each row's label; guided (s = 20) the classifier (at t = 0) agrees with the row's label."""
    classifier = NoisyClassifier.load_frozen(trained["classifier"])
    accuracy = {}
    for scale in ("0", "20"):
        out = tmp_path / f"scale{scale}.png"
        args = ["sample", "--ckpt", str(trained["denoiser"]), "--classifier", str(trained["classifier"]),
                "--classifier-scale", scale, "--label", "0", "--label", "1", "--n", "8", "--steps", "10",
                "--out", str(out), "--device", "cpu"]
        assert main(args) == 0
        assert f"classifier_scale={scale}" in out.with_suffix(".txt").read_text()
        correct = []
        for label in (0, 1):
            files = sorted(out.with_suffix("").glob(f"row{label:02d}_*.png"))
            images = torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32)) for f in files])
            images = images.permute(0, 3, 1, 2) / 127.5 - 1
            with torch.no_grad():
                correct += (classifier(images, torch.zeros(len(files))).argmax(-1) == label).tolist()
        accuracy[scale] = sum(correct) / len(correct)
    assert accuracy["0"] == 0.5 and accuracy["20"] >= 0.8, accuracy


def test_sample_command_steers_a_text_denoiser_with_a_classifier(trained: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts and labels together: one grid row per (prompt, label) pair, each row steered towards its label."""
    use_toy_text_encoder(monkeypatch)
    torch.manual_seed(0)
    denoiser = Denoiser(**{**TINY_UNET, "num_timesteps": 100, "conditioning": "text", "ema_decay": None})
    saver = ModelCheckpoint(dirpath=tmp_path / "text", save_last=True, every_n_train_steps=1)
    trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[saver]).fit(
        denoiser, loader(bright_dark_batch(), 1))
    out = tmp_path / "steered.png"
    args = ["sample", "--ckpt", str(tmp_path / "text" / "last.ckpt"), "--classifier", str(trained["classifier"]),
            "--label", "0", "--label", "1", "--prompt", "a cat", "--prompt", "a dog", "--n", "2", "--steps", "4",
            "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    rows = [line for line in out.with_suffix(".txt").read_text().splitlines() if line.startswith("row ")]
    assert [row.split(" guidance")[0] for row in rows] == [
        "row 0: prompt='a cat' label=0", "row 1: prompt='a cat' label=1",
        "row 2: prompt='a dog' label=0", "row 3: prompt='a dog' label=1"], rows
    assert len(list(out.with_suffix("").glob("row03_*.png"))) == 2


class Kept:
    """An evaluator that keeps what it is given."""

    def __init__(self) -> None:
        self.produced: list[torch.Tensor] = []

    def update(self, real: torch.Tensor, produced: torch.Tensor, captions: object) -> None:
        self.produced.append(produced)


def test_evaluation_steers_each_sample_to_its_real_images_label(trained: dict[str, Path]) -> None:
    """`evaluate --classifier` without --label: each generated sample is steered to its real image's label."""
    import argparse

    from lightning_diffusion.commands.evaluate import classifier_guide, load_model
    from lightning_diffusion.metrics.evaluation import run_evaluation

    model = load_model(trained["denoiser"], "lightning_diffusion.diffusion.module.Denoiser", torch.device("cpu"))
    classifier = NoisyClassifier.load_frozen(trained["classifier"])
    labels = torch.tensor([0, 1] * 4)
    batches = [{"image": torch.zeros(8, 3, 16, 16), "label": labels},
               {"image": torch.zeros(8, 3, 16, 16), "label": 1 - labels}]
    accuracy = {}
    for scale in (0.0, 20.0):
        args = argparse.Namespace(classifier=trained["classifier"], classifier_scale=scale, label=None)
        guide, record = classifier_guide(args, model, "generation")
        assert record == {"classifier": str(trained["classifier"]), "scale": scale, "label": "each real image's"}
        kept = Kept()
        assert run_evaluation(model, batches, kept, 16, generate_options={"steps": 10}, guide=guide) == 16
        with torch.no_grad():
            predicted = classifier(torch.cat(kept.produced), torch.zeros(16)).argmax(-1)
        accuracy[scale] = (predicted == torch.cat([labels, 1 - labels])).float().mean().item()
    assert accuracy[20.0] >= 0.8 and accuracy[20.0] > accuracy[0.0], accuracy


def test_evaluate_command_records_the_classifier_and_refuses_stray_flags(trained: dict[str, Path], tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    write_shards(tmp_path / "shards", [8], prefix="val", extra=lambda shard, index: {"json": {"label": index % 2}})
    base = ["evaluate", "--ckpt", str(trained["denoiser"]), "--data", str(tmp_path / "shards" / "val-*.tar"),
            "--metrics", "fid", "--encoder", "effnet", "--num-samples", "8", "--batch-size", "4", "--steps", "4",
            "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
            "--model-class", "lightning_diffusion.diffusion.module.Denoiser"]
    assert main([*base, "--classifier", str(trained["classifier"]), "--label", "1", "--classifier-scale", "3",
                 "--out", str(tmp_path / "scores.json")]) == 0
    result = json.loads((tmp_path / "scores.json").read_text())
    assert result["classifier_guidance"] == {"classifier": str(trained["classifier"]), "scale": 3.0, "label": 1}
    assert result["num_samples"] == 8
    capsys.readouterr()
    for extra, message in ((["--label", "1"], "give --classifier CKPT"),
                           (["--classifier", str(trained["classifier"]), "--label", "2"], "--label must be in [0, 2)"),
                           (["--classifier", str(trained["denoiser"])], "is not a classifier checkpoint")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err


@pytest.mark.parametrize(("extra", "message"), [
    (["--classifier", "CLF"], "--classifier steers samples towards a class: give at least one --label"),
    (["--classifier", "CLF", "--label", "5"], "--label must be in [0, 2)"),
    (["--classifier", "CLF", "--label", "1", "--classifier-scale", "-1"], "--classifier-scale must be >= 0"),
    (["--classifier", "missing.ckpt", "--label", "1"], "does not exist"),
    (["--classifier", "DENOISER", "--label", "1"], "is not a classifier checkpoint"),
])
def test_bad_classifier_input_is_a_one_line_user_error(trained: dict[str, Path], tmp_path: Path, extra: list[str],
                                                       message: str, capsys: pytest.CaptureFixture) -> None:
    names = {"CLF": str(trained["classifier"]), "DENOISER": str(trained["denoiser"])}
    extra = [names.get(arg, arg) for arg in extra]
    assert main(["sample", "--ckpt", str(trained["denoiser"]), "--out", str(tmp_path / "x.png"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


@pytest.mark.parametrize(("denoiser_args", "message"), [
    (dict(objective="flow", val_sampler="euler"), "objective is 'flow'"),
    (dict(schedule="linear"), "cosine schedule with 100 steps"),
    (dict(image_size=32), "train the classifier at the denoiser's model.image_size"),
    (dict(objective="v", zero_terminal_snr=True), "zero-terminal-SNR"),
])
def test_classifier_must_read_the_denoisers_noisy_samples(trained: dict[str, Path], denoiser_args: dict,
                                                          message: str) -> None:
    classifier = NoisyClassifier.load_frozen(trained["classifier"])
    denoiser = Denoiser(**{**TINY_UNET, "num_timesteps": 100, "conditioning": "none", **denoiser_args})
    with pytest.raises(UserError, match=message):
        guidance_wrapper(denoiser, classifier, [0], 1.0)


def test_label_derived_from_a_json_metadata_entry(tmp_path: Path) -> None:
    decoder = SampleDecoder(image_size=8, label_field="style", label_classes=("3d", "flat"))
    sample = {"__key__": "a", "png": png_bytes(0), "txt": b"a flat vector emoji of cat",
              "json": json.dumps({"style": "flat", "label": 7}).encode()}
    assert decoder(sample)["label"] == 1  # the derived label wins over a json `label`
    for bad in ({"style": "pixel-art"}, {"concept": "cat"}):
        with pytest.raises(CorruptSample, match="style"):
            decoder({**sample, "json": json.dumps(bad).encode()})
    styles = ["3d", "sketch", "flat", "3d"]  # the sketch sample is skipped and counted
    write_shards(tmp_path, [4], extra=lambda shard, index: {"json": {"style": styles[index]}})
    dm = ShardDataModule(str(tmp_path / "train-*.tar"), image_size=8, batch_size=1, num_workers=0,
                         shuffle_buffer=0, label_field="style", label_classes=["3d", "flat"])
    dm.setup("fit")
    with pytest.warns(SkippedSampleWarning, match="sketch"):
        batches = list(dm.train_dataloader())
    labels = {batch["key"][0]: batch["label"].item() for batch in batches}  # a refill may repeat a good sample
    assert labels == {"train0_000": 0, "train0_002": 1, "train0_003": 0}
    assert dm.skipped_samples == {"train": 1}


@pytest.mark.parametrize("options", [dict(label_field="style"), dict(label_classes=["3d", "flat"]),
                                     dict(label_field="style", label_classes=["3d"]),
                                     dict(label_field="style", label_classes="3d,flat")])
def test_label_options_go_together(tmp_path: Path, options: dict) -> None:
    with pytest.raises(UserError, match="data.label_field and data.label_classes go together"):
        ShardDataModule(str(tmp_path / "train-*.tar"), **options)


def test_classifier_needs_labels_in_range() -> None:
    model = NoisyClassifier(**TINY_CLASSIFIER)
    with pytest.raises(UserError, match="data.label_field"):
        model.batch_labels({"label": torch.tensor([0, -1])})
    with pytest.raises(UserError, match="model.num_classes must be at least 2"):
        NoisyClassifier(**{**TINY_CLASSIFIER, "num_classes": 1})


def test_a_grid_without_captions_logs_to_wandb(tmp_path: Path) -> None:
    """The unconditional denoiser's validation grid has no caption; WandbLogger refused `caption=None`."""
    from lightning.pytorch.loggers import WandbLogger

    from lightning_diffusion.diffusion.grids import log_grid

    logger = WandbLogger(save_dir=str(tmp_path), mode="disabled")
    log_grid(logger, "samples/unconditional", torch.zeros(3, 8, 8, dtype=torch.uint8), 1, None)
    log_grid(logger, "samples/labels", torch.zeros(3, 8, 8, dtype=torch.uint8), 2, "label 0")


def test_latent_classifier_guides_a_latent_denoiser(tmp_path: Path, trained: dict[str, Path]) -> None:
    from test_denoiser import tiny_vae_checkpoint

    torch.manual_seed(0)
    vae_path = str(tiny_vae_checkpoint(tmp_path / "vae.ckpt", scale=0.7))
    classifier = NoisyClassifier(**{**TINY_CLASSIFIER, "attention_resolutions": (4,)}, space="latent",
                                 vae_checkpoint=vae_path)
    assert classifier.input_shape == (4, 8, 8)
    batch = bright_dark_batch(4)
    latent = torch.randn(4, 4, 8, 8)
    torch.testing.assert_close(classifier.batch_x0({**batch, "latent": latent}), latent * 0.7)
    assert all(key.startswith("network.") for key in classifier.state_dict())  # the VAE is not saved again
    trainer(tmp_path, max_steps=2).fit(classifier, loader(batch, 2))
    denoiser = Denoiser(**{**TINY_UNET, "attention_resolutions": (4,)}, num_timesteps=100, conditioning="none",
                        space="latent", vae_checkpoint=vae_path).eval()
    images = denoiser.generate(num_samples=2, steps=2, model_wrapper=guidance_wrapper(denoiser, classifier, [0, 1], 3.0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    with pytest.raises(UserError, match="--classifier reads pixel inputs"):
        guidance_wrapper(denoiser, NoisyClassifier.load_frozen(trained["classifier"]), [0], 1.0)


@pytest.mark.parametrize(("class_path", "message"), [
    ("lightning_diffusion.diffusion.module.Denoiser", "holds a denoiser model .* not a classifier one"),
    ("os.system", "refused without importing it"),
])
def test_classifier_loading_follows_the_class_path_rule(trained: dict[str, Path], tmp_path: Path, class_path: str,
                                                        message: str) -> None:
    checkpoint = torch.load(trained["classifier"], weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = class_path
    torch.save(checkpoint, tmp_path / "named.ckpt")
    with pytest.raises(UserError, match=message):
        NoisyClassifier.load_frozen(tmp_path / "named.ckpt")
    checkpoint["hyper_parameters"]["_class_path"] = "lightning_diffusion.classifier.module.NoisyClassifier"
    torch.save(checkpoint, tmp_path / "own.ckpt")
    assert isinstance(NoisyClassifier.load_frozen(tmp_path / "own.ckpt"), NoisyClassifier)
