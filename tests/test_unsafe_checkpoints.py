"""Checkpoints and weight files from outside load with weights_only=True: a crafted pickle whose `__reduce__` would
run a command is refused by every loading path with one `UserError` naming the file, and the command never runs,
also with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set (which switches torch's default, not an explicit weights_only)."""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from checkpoint_support import TINY_DENOISER, fit_config, vae_checkpoint, write_image_shards
from denoiser_support import one_thread

from lightning_diffusion.errors import UserError


class RunsCode:
    """Unpickling this would run `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def craft(path: Path, marker: Path, form: str) -> Path:
    """A checkpoint-looking file holding `RunsCode`: torch's zip format, its legacy format, or a bare pickle."""
    payload = {"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"x": RunsCode(marker)}}
    if form == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=form == "zip")
    return path


def test_the_crafted_file_does_run_code_when_loaded_unsafely(tmp_path: Path) -> None:
    """The control: without weights_only (here: torch's default, switched by the environment variable the fixture
    sets) the marker appears, so its absence below means the file was refused."""
    marker = tmp_path / "marker"
    torch.load(craft(tmp_path / "evil.ckpt", marker, "zip"))
    assert marker.exists()


def test_a_tensor_stored_in_a_shard_is_loaded_weights_only(tmp_path: Path) -> None:
    """Pre-encoded shards hold `.pth` tensors (data_pipelines/decoding.py): a crafted one fails to decode (the
    stream skips it as a bad sample) without running."""
    from data_pipelines.decoding import load_tensor

    marker = tmp_path / "marker"
    with pytest.raises(pickle.UnpicklingError):
        load_tensor(craft(tmp_path / "latent.pth", marker, "zip").read_bytes(), "latent.pth")
    assert not marker.exists()


def _sample(path: Path, tmp: Path) -> int:
    from lightning_diffusion.cli import main

    return main(["sample", "--ckpt", str(path), "--n", "1", "--steps", "1", "--out", str(tmp / "out.png")])


def _evaluate(path: Path, tmp: Path) -> int:
    from lightning_diffusion.cli import main

    shards = write_image_shards(tmp / "shards")
    return main(["evaluate", "--ckpt", str(path), "--data", shards, "--metrics", "psnr", "--num-samples", "4",
                 "--device", "cpu", "--out", str(tmp / "out.json")])


def _evaluate_clip(path: Path, tmp: Path) -> int:
    from lightning_diffusion.cli import main

    shards = write_image_shards(tmp / "shards")
    return main(["evaluate", "--ckpt", str(vae_checkpoint(tmp / "vae.ckpt")), "--data", shards, "--metrics", "fid",
                 "--encoder", "clip", "--clip-ckpt", str(path), "--num-samples", "4", "--device", "cpu",
                 "--out", str(tmp / "out.json")])


def _encode_latents(path: Path, tmp: Path) -> int:
    from data_pipelines.cli import main

    shards = write_image_shards(tmp / "shards")
    return main(["encode-latents", "--vae", str(path), "--in", shards, "--out", str(tmp / "latents"),
                 "--num-workers", "0", "--device", "cpu"])


def _fit_resume(path: Path, tmp: Path) -> int:
    from lightning_diffusion.cli import main

    config = fit_config(tmp / "c.yaml", "denoiser", tmp / "run", write_image_shards(tmp / "shards"))
    return main(["fit", "--config", str(config), "--ckpt_path", str(path)])


def _fit_validate(path: Path, tmp: Path) -> int:
    from lightning_diffusion.cli import main

    config = fit_config(tmp / "c.yaml", "denoiser", tmp / "run", write_image_shards(tmp / "shards"),
                        trainer={"limit_val_batches": 1})
    return main(["validate", "--config", str(config), "--ckpt_path", str(path)])


RESUME_CALLBACK = {"class_path": "lightning_diffusion.training.resume.ResumeCheckpoint",
                   "init_args": {"every_n_train_steps": 1}}


def _auto_resume(path: Path, tmp: Path) -> int:
    """`fit` without --ckpt_path picks up the newest `<root>/resume/step-*.ckpt` (training/resume.py)."""
    from lightning_diffusion.cli import main

    config = fit_config(tmp / "c.yaml", "denoiser", tmp / "run", write_image_shards(tmp / "shards"),
                        trainer={"callbacks": [RESUME_CALLBACK]})
    (tmp / "run" / "resume").mkdir(parents=True)
    path.rename(tmp / "run" / "resume" / "step-000000001.ckpt")
    return main(["fit", "--config", str(config)])


SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "unsafe", "SLURM_JOB_ID": "7",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


def _slurm_restore(path: Path, tmp: Path) -> int:
    """Under SLURM, Lightning restores `<default_root_dir>/hpc_ckpt_<n>.ckpt` by itself (a requeued job)."""
    from lightning_diffusion.cli import main

    config = fit_config(tmp / "c.yaml", "denoiser", tmp / "run", write_image_shards(tmp / "shards"))
    (tmp / "run").mkdir()
    path.rename(tmp / "run" / "hpc_ckpt_1.ckpt")
    saved = {name: os.environ.get(name) for name in SLURM_ENV}
    os.environ.update(SLURM_ENV)
    try:
        return main(["fit", "--config", str(config)])
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _fit_url(path: Path, tmp: Path) -> int:
    """`--ckpt_path http://...` with the explicit flag: downloaded, then still loaded weights-only."""
    from lightning_diffusion.cli import main

    config = fit_config(tmp / "c.yaml", "denoiser", tmp / "run", write_image_shards(tmp / "shards"))
    with serve(path.parent) as base:
        return main(["fit", "--config", str(config), "--ckpt_path", f"{base}/{path.name}",
                     "--allow_url_ckpt_path", "true"])


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """A local HTTP server for `folder` (the URL path of the tests; nothing leaves the machine)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _fit_latent_denoiser(path: Path, tmp: Path) -> int:
    from lightning_diffusion.cli import main

    config = fit_config(tmp / "c.yaml", "denoiser", tmp / "run", write_image_shards(tmp / "shards"),
                        model={"space": "latent", "vae_checkpoint": str(path)})
    return main(["fit", "--config", str(config)])


def _lpips(path: Path, tmp: Path) -> None:
    from lightning_diffusion.pretrained.lpips import BACKBONE_FILES, make_lpips

    target = tmp / "torch" / "hub" / "checkpoints" / BACKBONE_FILES["alex"][0]
    target.parent.mkdir(parents=True)
    path.rename(target)
    make_lpips("alex", tmp / "torch")


def _open_clip_pretrained(path: Path, tmp: Path) -> None:
    from lightning_diffusion.clip import CLIPModule

    CLIPModule(model_name="ld-tiny-rn", pretrained=str(path))


def _load_frozen(loader: str) -> Callable[[Path, Path], object]:
    def load(path: Path, tmp: Path) -> object:
        from lightning_diffusion.autoencoder import VAEGAN
        from lightning_diffusion.clip import CLIPImageEncoder, CLIPTextEncoder
        from lightning_diffusion.diffusion.module import Denoiser

        if loader == "vae":
            return VAEGAN.load_frozen(path)
        if loader == "clip_text":
            return CLIPTextEncoder.from_checkpoint(path)
        if loader == "clip_image":
            return CLIPImageEncoder.from_checkpoint(path)
        if loader == "classifier":
            from lightning_diffusion.classifier.module import NoisyClassifier

            return NoisyClassifier.load_frozen(path)
        return Denoiser(**{**TINY_DENOISER, "conditioning": "text", "text_encoder": "clip",
                           "clip_checkpoint": str(path)})
    return load


def _plain(function: str) -> Callable[[Path, Path], object]:
    def load(path: Path, tmp: Path) -> object:
        from lightning_diffusion.training.checkpoints import check_checkpoint, load_checkpoint
        from lightning_diffusion.metrics.encoders import InceptionV3Encoder
        from lightning_diffusion.pretrained.efficientnet import load_efficientnet_lite0

        return {"load_checkpoint": load_checkpoint, "check_checkpoint": check_checkpoint,
                "effnet": load_efficientnet_lite0, "inception": InceptionV3Encoder}[function](path)
    return load


PATHS: dict[str, Callable[[Path, Path], object]] = {
    "load_checkpoint": _plain("load_checkpoint"),
    "check_checkpoint": _plain("check_checkpoint"),
    "VAEGAN.load_frozen": _load_frozen("vae"),
    "CLIPTextEncoder.from_checkpoint": _load_frozen("clip_text"),
    "CLIPImageEncoder.from_checkpoint": _load_frozen("clip_image"),
    "Denoiser clip_checkpoint": _load_frozen("denoiser"),
    "NoisyClassifier.load_frozen (sample/evaluate --classifier)": _load_frozen("classifier"),
    "EfficientNet-Lite0 weights": _plain("effnet"),
    "Inception-v3 weights": _plain("inception"),
    "LPIPS backbone in TORCH_HOME": _lpips,
    "CLIPModule pretrained file": _open_clip_pretrained,
    "sample --ckpt": _sample,
    "evaluate --ckpt": _evaluate,
    "evaluate --clip-ckpt": _evaluate_clip,
    "encode-latents --vae": _encode_latents,
    "fit model.vae_checkpoint": _fit_latent_denoiser,
    "fit --ckpt_path": _fit_resume,
    "validate --ckpt_path": _fit_validate,
    "fit auto-resume step-*.ckpt": _auto_resume,
    "fit SLURM restore hpc_ckpt_*.ckpt": _slurm_restore,
    "fit --ckpt_path URL --allow_url_ckpt_path": _fit_url,
}


# Every path with torch's zip format; the legacy format and a bare pickle through the shared loaders and a command.
CASES = [(name, "zip") for name in PATHS] + [
    (name, form) for name in ("load_checkpoint", "check_checkpoint", "sample --ckpt") for form in ("legacy", "pickle")]


@pytest.fixture(autouse=True)
def _torch_told_to_unpickle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What a hostile or careless environment sets: torch's default becomes full unpickling."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # where a URL would be downloaded to


@pytest.mark.parametrize(("name", "form"), CASES, ids=[f"{name}-{form}" for name, form in CASES])
def test_every_loading_path_refuses_a_pickle_that_runs_code(name: str, form: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    evil = craft(tmp_path / "evil.ckpt", marker, form)
    capsys.readouterr()
    with one_thread():
        try:
            result = PATHS[name](evil, tmp_path)
        except UserError as err:
            message = str(err)
        else:
            assert result == 2, f"{name} accepted the file"
            message = capsys.readouterr().err.strip()
            assert len(message.splitlines()) == 1 and message.startswith("error: "), message
    assert not marker.exists(), f"{name} ran the pickle's code"
    assert "was refused" in message and "would run arbitrary code" in message, message
    assert any(name in message for name in ("evil", "alexnet", "step-000000001.ckpt", "hpc_ckpt_1.ckpt")), message
