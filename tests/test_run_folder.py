"""A run lives in one folder: `trainer.default_root_dir` holds its checkpoints, resume files, W&B run and config;
two roots give two complete, separate runs; a model whose image_size differs from the data's is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_diffusion.cli import main
from test_tracking import BORING_DATA, MODEL, TinyLoggingModel, offline_wandb, written_runs  # noqa: F401 - fixture re-used

REPO = Path(__file__).resolve().parents[1]
# a monitored best.ckpt, last.ckpt, and resume files: none of them names a folder (as in configs/)
CONFIG = {
    "seed_everything": 0,
    "model": {"class_path": MODEL},
    "data": {"class_path": BORING_DATA},
    "trainer": {
        "max_steps": 4, "log_every_n_steps": 1, "limit_val_batches": 0, "enable_progress_bar": False,
        "enable_model_summary": False, "default_root_dir": "runs/tiny",
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
                "filename": "best", "monitor": "train/loss", "save_top_k": 1, "enable_version_counter": False}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
                "save_top_k": 0, "save_last": True, "enable_version_counter": False}},
            {"class_path": "lightning_diffusion.training.resume.ResumeCheckpoint", "init_args": {
                "every_n_train_steps": 2, "keep_last": 1}},
        ],
    },
}


def fit(root: Path, *extra: str, config_dir: Path | None = None) -> int:
    """`fit --config <tiny config> --trainer.default_root_dir ROOT ...` (the config file in `config_dir`, default
    next to ROOT)."""
    config = (config_dir or root.parent) / "tiny.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    return main(["fit", "--config", str(config), "--trainer.default_root_dir", str(root), *extra])


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_two_roots_give_two_complete_separate_runs(offline_wandb: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    work = offline_wandb / "work"  # the working directory: nothing may land here but the two run folders
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("WANDB_DIR")  # the run folder decides where the W&B run goes
    roots = [work / "runs" / "a", work / "runs" / "b"]
    for lr, root in zip(("0.1", "0.05"), roots):
        assert fit(root, "--model.init_args.lr", lr, config_dir=offline_wandb) == 0
    assert sorted(p.name for p in work.iterdir()) == ["runs"] and sorted(p.name for p in (work / "runs").iterdir()) == [
        "a", "b"]

    written = [files(root) for root in roots]
    for root, names in zip(roots, written):
        assert {"config.yaml", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "resume/step-000000004.ckpt",
                "wandb/run_id"} <= names, sorted(names)
        assert all(n.startswith(("config.yaml", "checkpoints/", "resume/", "wandb/")) for n in names), sorted(names)
        assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
        saved = yaml.safe_load((root / "config.yaml").read_text())
        assert Path(saved["trainer"]["default_root_dir"]) == root
        (run,) = written_runs(root)
        assert run.path.parent == root / "wandb" and run.history["train/loss"]
    assert {yaml.safe_load((r / "config.yaml").read_text())["model"]["init_args"]["lr"] for r in roots} == {0.1, 0.05}
    ids = [(root / "wandb" / "run_id").read_text() for root in roots]
    assert ids[0] != ids[1]
    # same file names, different contents: nothing is shared between the runs
    common = {n for n in written[0] & written[1] if n.endswith(".ckpt")}
    assert common and all((roots[0] / n).read_bytes() != (roots[1] / n).read_bytes() for n in common)


def test_rerun_resumes_in_its_own_folder(offline_wandb: Path) -> None:  # noqa: F811
    root = offline_wandb / "run"
    assert fit(root, "--trainer.logger", "false") == 0
    assert fit(root, "--trainer.logger", "false", "--trainer.max_steps", "6") == 0  # resumes from resume/step-4
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert sorted(files(root / "resume")) == ["step-000000006.ckpt"]
    assert not (root / "lightning_logs").exists()


def test_lightning_default_logger_stays_in_the_root(offline_wandb: Path) -> None:  # noqa: F811
    """`--trainer.logger true` (Lightning's own CSV/TensorBoard logger): logs in a version folder of the root,
    checkpoints and config.yaml at fixed places of the root, not in the logger's version folder."""
    root = offline_wandb / "run"
    assert fit(root, "--trainer.logger", "true") == 0
    names = files(root)
    assert {"config.yaml", "checkpoints/last.ckpt", "checkpoints/best.ckpt"} <= names
    assert any(n.startswith("lightning_logs/version_0/") for n in names), sorted(names)
    assert not any("version_0/checkpoints" in n or n.endswith("version_0/config.yaml") for n in names)


def test_an_explicit_dirpath_is_kept(offline_wandb: Path) -> None:  # noqa: F811
    root, elsewhere = offline_wandb / "run", offline_wandb / "chosen"
    assert fit(root, "--trainer.logger", "false", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
               f"--trainer.callbacks.dirpath={elsewhere}", "--trainer.callbacks.filename=mine",
               "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.every_n_train_steps=4") == 0
    assert (root / "checkpoints" / "last.ckpt").is_file() and files(elsewhere) == {"mine.ckpt"}


def test_default_root_dir_on_a_file_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "taken.txt"
    target.write_text("not a folder")
    for root in (target, target / "below"):
        assert fit(root, config_dir=tmp_path) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: trainer.default_root_dir") and err.count("\n") == 1, err
        assert "file" in err and "--trainer.default_root_dir" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.txt", "tiny.yaml"]


@pytest.mark.parametrize(("config", "extra"), [
    ("configs/vae_gan/tiny.yaml", ["--model.init_args.perceptual", "none", "--model.init_args.val_frechet", "false"]),
    ("configs/denoiser/pixel_tiny.yaml", ["--model.init_args.conditioning", "none", "--model.init_args.val_guidance", "1"]),
])
def test_model_and_data_image_size_must_agree(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, config: str, extra: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    size = yaml.safe_load((REPO / config).read_text())["model"]["init_args"]["image_size"]
    args = ["fit", "--config", str(REPO / config), *extra, "--data.init_args.train_urls", "none-*.tar",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false"]
    assert main([*args, "--data.init_args.image_size", str(2 * size)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"model.init_args.image_size is {size} but data.init_args.image_size is {2 * size}" in err
    assert list(tmp_path.iterdir()) == []
    # equal sizes pass this check and reach the next one (the missing shards)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "image_size" not in err and "none-*.tar" in err, err


def test_image_sizes_are_checked_in_setup_for_python_fits(tmp_path: Path) -> None:
    """`Trainer.fit(model, datamodule)` without the CLI: the DataModule's setup refuses the mismatch before a step."""
    import lightning as L

    from data_pipelines.datamodule import ShardDataModule
    from lightning_diffusion.clip.module import CLIPModule
    from lightning_diffusion.errors import UserError

    config = yaml.safe_load((REPO / "configs/clip/tiny.yaml").read_text())["model"]["init_args"]
    model = CLIPModule(**{**config, "image_size": 32})
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(UserError, match="model.init_args.image_size is 32 but data.init_args.image_size is 64"):
        trainer.fit(model, datamodule=ShardDataModule(str(tmp_path / "none-*.tar"), image_size=64))


def test_pre_encoded_latents_have_no_pixel_size_to_compare() -> None:
    from data_pipelines.datamodule import ShardDataModule
    from lightning_diffusion.training.consistency import data_image_size

    images = ShardDataModule("x-*.tar", image_size=48)
    latents = ShardDataModule("x-*.tar", image_size=48, image_keys=[], tensor_keys=["latent.npy"])
    assert (data_image_size(images), data_image_size(latents), data_image_size(None)) == (48, None, None)


class ValidatedModel(TinyLoggingModel):
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self.layer(batch).pow(2).mean())


def test_validate_on_a_run_folder_keeps_the_training_config(offline_wandb: Path) -> None:  # noqa: F811
    root = offline_wandb / "run"
    validated = f"{__name__}.ValidatedModel"
    assert fit(root, "--trainer.logger", "false", "--model", validated, "--model.init_args.lr", "0.05") == 0
    trained = (root / "config.yaml").read_text()
    assert main(["validate", "--model", validated, "--data", BORING_DATA, "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
                 "--ckpt_path", str(root / "checkpoints" / "last.ckpt")]) == 0
    assert (root / "config.yaml").read_text() == trained
    assert yaml.safe_load((root / "config-validate.yaml").read_text())["ckpt_path"] == str(root / "checkpoints" / "last.ckpt")


def test_image_grids_and_the_wandb_run_of_a_real_model_land_in_the_root(
    offline_wandb: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """The tiny VAE-GAN with the default (W&B) logger: its reconstruction grids, checkpoints and run in the root."""
    from checkpoint_support import fit_config, write_image_shards

    monkeypatch.chdir(offline_wandb)
    monkeypatch.delenv("WANDB_DIR")
    shards = offline_wandb / "shards"
    shards.mkdir()
    root = offline_wandb / "vae_run"
    urls = write_image_shards(shards)
    config = fit_config(offline_wandb / "vae.yaml", "vae", root, urls, data={"val_urls": urls},
                        model={"image_every_n_steps": 1, "num_logged_images": 2},
                        trainer={"max_steps": 2, "limit_val_batches": 1, "val_check_interval": 2})
    spec = yaml.safe_load(config.read_text())
    del spec["trainer"]["logger"]  # the project's default: offline W&B
    config.write_text(yaml.safe_dump(spec))
    before = {p.name for p in offline_wandb.iterdir()} - {"cache", "wandb_config"}  # wandb's own debug logs
    assert main(["fit", "--config", str(config)]) == 0
    assert {p.name for p in offline_wandb.iterdir()} - {"cache", "wandb_config"} == before | {"vae_run"}
    names = files(root)
    # Lightning's default ModelCheckpoint (no dirpath) as well
    assert {"config.yaml", "checkpoints/epoch=0-step=2.ckpt", "reconstructions/step0000002.png"} <= names, sorted(names)
    (run,) = written_runs(root)
    assert "val/reconstructions" in run.images
