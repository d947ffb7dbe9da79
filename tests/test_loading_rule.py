"""The loading rule beyond pickles (lightning_diffusion/training/checkpoints.py): class paths read from files are
resolved only to the project's models, before anything is imported; URLs need an explicit flag; a checkpoint of
another model, a missing, empty, truncated or folder `--ckpt_path`, and an unreadable resume file are one-line
errors (exit 2); commands never delete folders they did not write."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning
import pytest
import torch
import yaml
from checkpoint_support import (
    clip_checkpoint,
    denoiser_checkpoint,
    fit_config,
    vae_checkpoint,
    write_image_shards,
)
from denoiser_support import one_thread

from lightning_diffusion.cli import main
from lightning_diffusion.errors import UserError
from lightning_diffusion.training.checkpoints import (
    MODEL_CLASSES,
    check_checkpoint_class,
    load_checkpoint,
    register_model_class,
    resolve_model_class,
)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, expect exit status 2 and one `error:` line on stderr; return that line."""
    capsys.readouterr()
    with one_thread():
        code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def importable_trap(folder: Path, marker: Path) -> str:
    """A module on sys.path whose import creates `marker`: resolving a class path must never import it."""
    (folder / "ld_trap_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model:\n    pass\n")
    return "ld_trap_module.Model"


# ----------------------------------------------------------------------------------------- resolve_model_class
def test_project_classes_resolve_by_canonical_path_and_re_export() -> None:
    from lightning_diffusion.autoencoder import VAEGAN
    from lightning_diffusion.diffusion.module import Denoiser

    assert resolve_model_class("lightning_diffusion.autoencoder.module.VAEGAN") is VAEGAN
    assert resolve_model_class("lightning_diffusion.autoencoder.VAEGAN", "VAE-GAN") is VAEGAN
    assert resolve_model_class("lightning_diffusion.diffusion.module.Denoiser", Denoiser) is Denoiser
    with pytest.raises(UserError, match="holds a VAE-GAN model .* not a denoiser one"):
        resolve_model_class("lightning_diffusion.autoencoder.VAEGAN", "denoiser")


@pytest.mark.parametrize("class_path", ["subprocess.Popen", "os.system", "builtins.eval", "lightning_diffusion.cli.main",
                                        "lightning_diffusion.__main__.X", "torch.nn.Linear", "VAEGAN", 42, None,
                                        "lightning_diffusion.autoencoder.module.VAEGAN; import os"])
def test_anything_else_is_refused_in_one_line(class_path: object) -> None:
    with pytest.raises(UserError, match="not a model of this project") as caught:
        resolve_model_class(class_path, source="checkpoint 'x.ckpt'")
    assert len(str(caught.value).splitlines()) == 1


def test_a_class_path_is_refused_before_its_module_is_imported(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="refused without importing it"):
        resolve_model_class(importable_trap(tmp_path, marker))
    assert not marker.exists() and "ld_trap_module" not in sys.modules


def test_the_set_of_model_classes_is_extendable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another project model (e.g. the noisy classifier) joins the rule by registering its canonical path."""
    monkeypatch.setattr("lightning_diffusion.training.checkpoints.MODEL_CLASSES", dict(MODEL_CLASSES))
    with pytest.raises(UserError):
        resolve_model_class("lightning_diffusion.metrics.perceptual.PerceptualDistance")
    register_model_class("lightning_diffusion.metrics.perceptual.PerceptualDistance", "perceptual")
    from lightning_diffusion.metrics.perceptual import PerceptualDistance

    assert resolve_model_class("lightning_diffusion.metrics.PerceptualDistance", "perceptual") is PerceptualDistance


def test_frozen_loaders_refuse_another_models_checkpoint(tmp_path: Path) -> None:
    from lightning_diffusion.autoencoder import VAEGAN

    clip = clip_checkpoint(tmp_path / "clip.ckpt")
    with pytest.raises(UserError, match="holds a CLIP model .* not a VAE-GAN one"):
        VAEGAN.load_frozen(clip)
    check_checkpoint_class(torch.load(clip, weights_only=True), "CLIP", path=clip)


# ------------------------------------------------------------------------------------------------- evaluate
def _evaluate(ckpt: Path, tmp: Path, *extra: str) -> list[str]:
    shards = write_image_shards(tmp / "shards")
    return ["evaluate", "--ckpt", str(ckpt), "--data", shards, "--metrics", "psnr", "--num-samples", "4",
            "--device", "cpu", "--out", str(tmp / "out.json"), *extra]


def test_evaluate_does_not_build_a_class_a_safe_checkpoint_names(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Plain strings and tensors pass weights_only; the class path in them is what would run code."""
    marker = tmp_path / "marker"
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "subprocess.Popen",
                                                       "args": ["touch", str(marker)]}}, ckpt)
    err = run_cli(_evaluate(ckpt, tmp_path), capsys)
    assert "subprocess.Popen" in err and "not a model of this project" in err
    assert not marker.exists()


def test_evaluate_does_not_import_a_class_the_config_beside_the_checkpoint_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    ckpt = run / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, ckpt)
    (tmp_path / "run" / "config.yaml").write_text(
        yaml.safe_dump({"model": {"class_path": importable_trap(tmp_path, marker)}}))
    err = run_cli(_evaluate(ckpt, tmp_path), capsys)
    assert "config.yaml" in err and "ld_trap_module.Model" in err
    assert not marker.exists()


def test_evaluate_model_class_argument_must_be_a_lightning_module(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--model-class is the user's own choice (imported as given, like a config's class_path), but it is only
    instantiated if it is a LightningModule."""
    ckpt = tmp_path / "model.ckpt"
    marker = tmp_path / "marker"
    torch.save({"state_dict": {}, "hyper_parameters": {"args": ["touch", str(marker)]}}, ckpt)
    err = run_cli(_evaluate(ckpt, tmp_path, "--model-class", "subprocess.Popen"), capsys)
    assert "--model-class 'subprocess.Popen' is not a LightningModule class" in err
    assert not marker.exists()
    err = run_cli(_evaluate(ckpt, tmp_path, "--model-class", "no_such_module.Model"), capsys)
    assert "cannot be imported" in err


def test_sample_refuses_a_vae_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli(["sample", "--ckpt", str(vae_checkpoint(tmp_path / "vae.ckpt")), "--n", "1", "--steps", "1",
                   "--out", str(tmp_path / "grid.png")], capsys)
    assert "holds a VAE-GAN model" in err and "denoiser" in err
    assert not (tmp_path / "grid.png").exists()


# ------------------------------------------------------------------------------------------ fit --ckpt_path
def _vae_config(tmp: Path, **trainer: object) -> Path:
    return fit_config(tmp / "vae.yaml", "vae", tmp / "run", write_image_shards(tmp / "shards"), trainer=trainer)


def test_fit_refuses_another_models_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CLIP checkpoint given to the VAE-GAN config used to train CLIP (its stored class won)."""
    err = run_cli(["fit", "--config", str(_vae_config(tmp_path)), "--ckpt_path",
                   str(clip_checkpoint(tmp_path / "clip.ckpt"))], capsys)
    assert "holds a CLIP model" in err and "VAEGAN" in err
    assert not (tmp_path / "run" / "lightning_logs").exists()


def test_fit_refuses_a_checkpoint_naming_a_foreign_class(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": importable_trap(tmp_path, marker)}}, ckpt)
    err = run_cli(["fit", "--config", str(_vae_config(tmp_path)), "--ckpt_path", str(ckpt)], capsys)
    assert "'ld_trap_module.Model' but the config trains" in err
    assert not marker.exists() and "ld_trap_module" not in sys.modules


def test_fit_refuses_a_url_without_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli(["fit", "--config", str(_vae_config(tmp_path)), "--ckpt_path", "http://127.0.0.1:9/x.ckpt"],
                  capsys)
    assert "is a URL" in err and "--allow_url_ckpt_path true" in err


def _truncated(tmp: Path) -> Path:
    whole = vae_checkpoint(tmp / "whole.ckpt", **{})
    cut = tmp / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return cut


BAD_FILES = {
    "missing": (lambda tmp: tmp / "nope.ckpt", "does not exist"),
    "folder": (lambda tmp: tmp, "is a folder"),
    "empty": (lambda tmp: (tmp / "empty.ckpt").open("w").close() or tmp / "empty.ckpt", "is empty"),
    "truncated": (_truncated, "could not be read"),
    "not a checkpoint": (lambda tmp: torch.save([1, 2], tmp / "list.ckpt") or tmp / "list.ckpt",
                         "not a Lightning checkpoint"),
    "weights only": (lambda tmp: vae_checkpoint(tmp / "weights.ckpt"), "no trainer state"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_fit_ckpt_path_mistakes_are_one_line(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, expected = BAD_FILES[kind]
    err = run_cli(["fit", "--config", str(_vae_config(tmp_path)), "--ckpt_path", str(make(tmp_path))], capsys)
    assert expected in err and "--ckpt_path" in err


def test_fit_with_the_stored_weights_of_another_model_without_a_class_path(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint saved outside LightningCLI stores no class: its weights' mismatch is one line too."""
    config = fit_config(tmp_path / "d.yaml", "denoiser", tmp_path / "run", write_image_shards(tmp_path / "shards"))
    ckpt = denoiser_checkpoint(tmp_path / "denoiser.ckpt", base_channels=8)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"] = {}
    checkpoint["pytorch-lightning_version"] = lightning.__version__
    torch.save(checkpoint, ckpt)
    err = run_cli(["fit", "--config", str(config), "--ckpt_path", str(ckpt)], capsys)
    assert "do not fit the configured model" in err


SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "restore", "SLURM_JOB_ID": "7",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


@pytest.mark.parametrize("damage", ["empty", "truncated"])
@pytest.mark.parametrize("restore", ["auto-resume", "slurm"])
def test_an_unreadable_resume_file_is_one_line(restore: str, damage: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The newest `resume/step-*.ckpt` (auto-resume) or, under SLURM, `hpc_ckpt_*.ckpt` is damaged."""
    resume = {"class_path": "lightning_diffusion.training.resume.ResumeCheckpoint",
              "init_args": {"every_n_train_steps": 1}}
    config = _vae_config(tmp_path, callbacks=[resume])
    if restore == "slurm":
        for name, value in SLURM_ENV.items():
            monkeypatch.setenv(name, value)
        target = tmp_path / "run" / "hpc_ckpt_3.ckpt"
    else:
        target = tmp_path / "run" / "resume" / "step-000000003.ckpt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(_truncated(tmp_path).read_bytes() if damage == "truncated" else b"")
    err = run_cli(["fit", "--config", str(config)], capsys)
    assert target.name in err and ("is empty" in err or "could not be read" in err)


def test_load_checkpoint_refuses_urls_unless_allowed() -> None:
    with pytest.raises(UserError, match="is a URL"):
        load_checkpoint("https://example.invalid/x.ckpt", what="VAE-GAN checkpoint")
    with pytest.raises(UserError, match="could not be fetched"):
        load_checkpoint("file:///nonexistent/x.ckpt", allow_url=True)


# ------------------------------------------------------------------------------------------ other files
def test_minilm_folder_with_only_a_pickled_bin_is_refused(tmp_path: Path) -> None:
    from lightning_diffusion.clip.towers import minilm_dir

    for name in ("config.json", "tokenizer.json", "pytorch_model.bin"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(UserError, match=r"only pickled weights \(pytorch_model.bin\), no .safetensors"):
        minilm_dir(str(tmp_path))


def test_compare_refuses_a_config_yaml_with_python_tags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    run = tmp_path / "runs" / "a" / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("step,loss\n0,1.0\n")
    (tmp_path / "runs" / "a" / "config.yaml").write_text(f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    err = run_cli(["compare", str(tmp_path / "runs" / "a"), "--out", str(tmp_path / "cmp")], capsys)
    assert "config.yaml" in err and "not plain YAML" in err
    assert not marker.exists()


def test_pipeline_never_deletes_a_folder_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_diffusion.commands.pipeline import OWNED, remove_own_folder

    users = tmp_path / "out" / "vae_gan"
    users.mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="was not written by the pipeline"):
        remove_own_folder(users)
    assert (users / "notes.txt").read_text() == "mine"
    err = run_cli(["pipeline", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "no-data")], capsys)
    assert "vae_gan" in err and "not written by the pipeline" in err
    assert (users / "notes.txt").read_text() == "mine" and not (tmp_path / "out" / "data").exists()
    (users / OWNED).touch()  # a folder the pipeline made is its to clear
    remove_own_folder(users)
    assert not users.exists()

