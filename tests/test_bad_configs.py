"""Bad configs and arguments: one line `error: ...` naming the key or file and the fix, exit 2, no traceback, and
nothing written (no run folder, no output, no new file anywhere under the test's folders).

A table over the three models, the DataModule, the trainer section and the project commands. Most cases run
in-process through the CLI entry point (fast); three run as real subprocesses (`python -m ...`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from checkpoint_support import (
    clip_checkpoint, denoiser_checkpoint, fit_config, vae_checkpoint, write_image_shards,
)
from denoiser_support import one_thread

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Files:
    """Inputs shared by every case (a session fixture): shards and tiny checkpoints."""

    root: Path
    shards: str
    vae: Path  # f = 2, 4 latent channels
    vae8: Path  # the same with 8 latent channels
    clip: Path
    latent_denoiser: Path  # latent space on `vae`, unconditional
    flow_denoiser: Path  # pixel space, unconditional, flow objective (Euler sampler)


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("bad_config_inputs")
    with one_thread():
        vae = vae_checkpoint(root / "vae.ckpt")
        return Files(
            root=root, shards=write_image_shards(root / "shards"), vae=vae,
            vae8=vae_checkpoint(root / "vae8.ckpt", latent_channels=8), clip=clip_checkpoint(root / "clip.ckpt"),
            latent_denoiser=denoiser_checkpoint(root / "latent.ckpt", space="latent", vae_checkpoint=str(vae)),
            flow_denoiser=denoiser_checkpoint(root / "flow.ckpt", objective="flow", val_sampler="euler"),
        )


class Env:
    """One case's folder: `fit` writes a config there and returns the command line; `out` is where outputs go."""

    def __init__(self, tmp: Path, files: Files) -> None:
        self.tmp, self.files = tmp, files
        self.run = tmp / "run"  # every fit's default_root_dir and logger folder
        self.out = tmp / "out"  # every command's output path

    def fit(self, stage: str, *extra: str, model: dict | None = None, data: dict | None = None,
            trainer: dict | None = None, default_logger: bool = False) -> list[str]:
        config = fit_config(self.tmp / "config.yaml", stage, self.run, self.files.shards, model=model, data=data,
                            trainer=trainer)
        if default_logger:  # the project's W&B logger (offline), whose folder goes under default_root_dir
            loaded = yaml.safe_load(config.read_text())
            loaded["trainer"].pop("logger")
            config.write_text(yaml.safe_dump(loaded, sort_keys=False))
        return ["fit", "--config", str(config), *extra]

    def write(self, name: str, content: object) -> Path:
        path = self.tmp / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return path

    def sample(self, ckpt: Path, *extra: str) -> list[str]:
        return ["sample", "--ckpt", str(ckpt), "--steps", "2", "--n", "1", "--device", "cpu",
                "--out", str(self.out / "grid.png"), *extra]

    def evaluate(self, ckpt: Path, *extra: str) -> list[str]:
        return ["evaluate", "--ckpt", str(ckpt), "--data", self.files.shards, "--num-samples", "4",
                "--batch-size", "2", "--device", "cpu", "--encoder", "effnet", "--cache-dir", str(self.tmp / "cache"),
                "--out", str(self.out / "result.json"), *extra]

    def pipeline(self, *extra: str) -> list[str]:
        return ["pipeline", "--out", str(self.out), "--data", str(Path(self.files.shards).parent), "--quiet", *extra]

    def sweep(self, spec: dict) -> list[str]:
        return ["sweep", str(self.write("sweep.yaml", spec)), "--dry-run", "--out", str(self.out),
                "--script", str(REPO / "slurm" / "sweep.sbatch")]


@dataclass
class Case:
    name: str
    args: Callable[[Env], list[str]]
    key: str  # the key, option or file the message must name
    fix: str  # a piece of the fix the message must give
    entry: str = "lightning_diffusion"  # or data_pipelines
    subprocess: bool = False


def _sweep(**spec: object) -> dict:
    return {"config": str(REPO / "configs" / "clip" / "tiny.yaml"), "parameters": {"model.init_args.lr": [1e-3]},
            **spec}


CASES = [
    # ---- VAE-GAN
    Case("vae unknown key", lambda e: e.fit("vae", "--model.init_args.chanels", "8"), "chanels", "--help",
         subprocess=True),
    Case("vae wrong type", lambda e: e.fit("vae", "--model.init_args.channels", "many"), "channels", "--help"),
    Case("vae zero channels", lambda e: e.fit("vae", model={"channels": 0}), "model.channels", "e.g."),
    Case("vae negative latent channels", lambda e: e.fit("vae", model={"latent_channels": -4}),
         "model.latent_channels", "e.g."),
    Case("vae empty channel_mults", lambda e: e.fit("vae", model={"channel_mults": []}), "model.channel_mults",
         "e.g."),
    Case("vae image size not divisible", lambda e: e.fit("vae", model={"image_size": 30, "channel_mults": [1, 2, 2]}),
         "model.image_size", "multiple of 4"),
    Case("vae hinge with label smoothing", lambda e: e.fit("vae", model={"real_label": 0.9}), "model.real_label",
         "non_saturating"),
    Case("vae negative lr", lambda e: e.fit("vae", model={"lr": -1e-4}), "model.lr", "e.g."),
    Case("vae zero latent_scale_batches", lambda e: e.fit("vae", model={"latent_scale_batches": 0}),
         "model.latent_scale_batches", "e.g."),
    # ---- CLIP
    Case("clip unknown model_name", lambda e: e.fit("clip", model={"model_name": "ld-tiny-xyz"}), "ld-tiny-xyz",
         "ld-tiny-rn"),
    Case("clip unknown loss", lambda e: e.fit("clip", "--model.init_args.loss", "triplet"), "loss", "--help"),
    Case("clip missing pretrained file", lambda e: e.fit("clip", model={"pretrained": str(e.tmp / "missing.pt")}),
         "missing.pt", "weights file"),
    Case("clip pretrained and tower start", lambda e: e.fit(
        "clip", model={"pretrained": "openai", "image_tower": "efficientnet_lite0"}), "pretrained", "set one of them"),
    Case("clip zero image_size", lambda e: e.fit("clip", model={"image_size": 0}), "model.image_size", "e.g."),
    Case("clip zero max_logit_scale", lambda e: e.fit("clip", model={"max_logit_scale": 0.0}),
         "model.max_logit_scale", "e.g."),
    # ---- denoiser
    Case("denoiser ddim with flow", lambda e: e.fit("denoiser", model={"objective": "flow", "val_sampler": "ddim"}),
         "model.val_sampler", "euler or heun", subprocess=True),
    Case("denoiser guidance without condition", lambda e: e.fit("denoiser", model={"val_guidance": 3.0}),
         "model.val_guidance", "use model.val_guidance 1"),
    Case("denoiser missing vae checkpoint", lambda e: e.fit(
        "denoiser", model={"space": "latent", "vae_checkpoint": str(e.tmp / "nope.ckpt")}), "nope.ckpt",
         "configs/vae_gan/tiny.yaml"),
    Case("denoiser vae checkpoint not set", lambda e: e.fit("denoiser", model={"space": "latent"}),
         "model.vae_checkpoint", "configs/vae_gan/tiny.yaml"),
    Case("denoiser vae checkpoint of another stage", lambda e: e.fit(
        "denoiser", model={"space": "latent", "vae_checkpoint": str(e.files.clip)}), "model.vae_checkpoint",
         "vae_gan stage"),
    Case("denoiser image size not divisible", lambda e: e.fit(
        "denoiser", model={"image_size": 18, "channel_mult": [1, 2, 2]}), "model.image_size", "model.channel_mult"),
    Case("denoiser zero base_channels", lambda e: e.fit("denoiser", model={"base_channels": 0}),
         "model.base_channels", "e.g."),
    Case("denoiser zero num_timesteps", lambda e: e.fit("denoiser", model={"num_timesteps": 0}),
         "model.num_timesteps", "e.g."),
    Case("denoiser p_uncond out of range", lambda e: e.fit("denoiser", model={"p_uncond": 1.5}), "model.p_uncond",
         "[0, 1)"),
    Case("denoiser class without num_classes", lambda e: e.fit("denoiser", model={"conditioning": "class"}),
         "model.num_classes", "number of labels"),
    Case("denoiser clip text encoder without checkpoint", lambda e: e.fit(
        "denoiser", model={"conditioning": "text", "text_encoder": "clip"}), "model.clip_checkpoint",
         "configs/clip/tiny.yaml"),
    Case("denoiser negative lr", lambda e: e.fit("denoiser", model={"lr": -1.0}), "model.lr", "e.g."),
    # ---- DataModule
    Case("data zero batch size", lambda e: e.fit("vae", data={"batch_size": 0}), "data.batch_size", "e.g."),
    Case("data missing shards", lambda e: e.fit("vae", data={"train_urls": str(e.tmp / "nothing-*.tar")},
                                                default_logger=True), "data.train_urls", "build-emoji"),
    Case("data unknown mode", lambda e: e.fit("vae", "--data.init_args.mode", "shuffled"), "mode", "--help"),
    Case("data samples_per_epoch when exhaustive", lambda e: e.fit("vae", data={"samples_per_epoch": 10}),
         "data.samples_per_epoch", "data.mode: resampled"),
    Case("data bad tensor key", lambda e: e.fit("vae", data={"tensor_keys": ["latent.txt"]}), "data.tensor_keys",
         "latent.npy"),
    Case("data negative workers", lambda e: e.fit("vae", data={"num_workers": -1}), "data.num_workers", "e.g."),
    Case("data unknown key", lambda e: e.fit("vae", "--data.init_args.batchsize", "4"), "batchsize", "--help"),
    # ---- trainer section and the config file
    Case("trainer unknown key", lambda e: e.fit("vae", "--trainer.maxsteps", "5"), "maxsteps", "--help"),
    Case("trainer wrong type", lambda e: e.fit("vae", "--trainer.max_epochs", "ten"), "trainer.max_epochs", "--help"),
    Case("trainer negative max_steps", lambda e: e.fit("vae", trainer={"max_steps": -5}), "trainer", "--help"),
    Case("trainer zero devices", lambda e: e.fit("vae", trainer={"devices": 0}), "trainer", "--help"),
    Case("trainer unknown precision", lambda e: e.fit("vae", "--trainer.precision", "17"), "precision", "--help"),
    Case("trainer zero num_nodes", lambda e: e.fit("vae", trainer={"num_nodes": 0}), "num_nodes", "--help"),
    Case("trainer unknown strategy", lambda e: e.fit("vae", trainer={"strategy": "dpp"}), "strategy='dpp'", "--help"),
    Case("trainer zero accumulate_grad_batches", lambda e: e.fit("denoiser", trainer={"accumulate_grad_batches": 0}),
         "trainer.accumulate_grad_batches", "e.g."),
    Case("trainer accumulation on the manual VAE-GAN", lambda e: e.fit("vae", trainer={"accumulate_grad_batches": 2}),
         "trainer.accumulate_grad_batches", "model.init_args.accumulate_grad_batches: 2"),
    Case("vae zero accumulate_grad_batches", lambda e: e.fit("vae", model={"accumulate_grad_batches": 0}),
         "model.accumulate_grad_batches", "e.g."),
    Case("denoiser unknown compile_backend", lambda e: e.fit("denoiser", model={"compile": True,
                                                                               "compile_backend": "fast"}),
         "model.compile_backend", "inductor"),
    Case("config unknown section", lambda e: ["fit", "--config", str(e.write("typo.yaml", {"modle": {"lr": 1}}))],
         "modle", "--help"),
    # ---- sample
    Case("sample missing checkpoint", lambda e: e.sample(e.tmp / "gone.ckpt"), "gone.ckpt", "train that stage",
         subprocess=True),
    Case("sample zero n", lambda e: e.sample(e.files.flow_denoiser, "--n", "0"), "--n", ">= 1"),
    Case("sample guidance on unconditional", lambda e: e.sample(e.files.flow_denoiser, "--guidance", "3"),
         "--guidance", "use --guidance 1"),
    Case("sample ddim with flow", lambda e: e.sample(e.files.flow_denoiser, "--sampler", "ddim"), "--sampler",
         "euler or heun"),
    Case("sample prompt on unconditional", lambda e: e.sample(e.files.flow_denoiser, "--prompt", "a koala"),
         "--prompt", "leave out --prompt"),
    Case("sample latent channels differ from the VAE", lambda e: e.sample(
        e.files.latent_denoiser, "--vae-checkpoint", str(e.files.vae8)), "latent channels", "--vae-checkpoint"),
    Case("sample missing vae override", lambda e: e.sample(
        e.files.latent_denoiser, "--vae-checkpoint", str(e.tmp / "novae.ckpt")), "novae.ckpt", "configs/vae_gan"),
    # ---- evaluate
    Case("evaluate missing checkpoint", lambda e: e.evaluate(e.tmp / "gone.ckpt"), "gone.ckpt", "train that stage"),
    Case("evaluate unknown metric", lambda e: e.evaluate(e.files.vae, "--metrics", "psnr,fidd"), "--metrics",
         "choose from"),
    Case("evaluate too few samples", lambda e: e.evaluate(e.files.vae, "--num-samples", "1"), "--num-samples",
         "at least 2"),
    Case("evaluate metric of the other task", lambda e: e.evaluate(e.files.vae, "--metrics", "clip_score"),
         "--metrics", "choose from"),
    Case("evaluate clip_score without a CLIP", lambda e: e.evaluate(e.files.flow_denoiser, "--metrics", "clip_score"),
         "--clip-ckpt", "pass --clip-ckpt"),
    Case("evaluate missing shards", lambda e: [*e.evaluate(e.files.vae)[:4], str(e.tmp / "none-*.tar"),
                                               *e.evaluate(e.files.vae)[5:]], "--data", "none-*.tar"),
    Case("evaluate DDIM with a flow model", lambda e: e.evaluate(e.files.flow_denoiser, "--metrics", "fid",
                                                                 "--sampler", "ddim"), "--sampler", "euler or heun"),
    Case("evaluate guidance for an autoencoder", lambda e: e.evaluate(e.files.vae, "--guidance", "3"), "--guidance",
         "denoiser checkpoints"),
    # ---- pipeline (its stages are never started: see _no_stage_runs)
    Case("pipeline missing preset", lambda e: e.pipeline("--preset", str(e.tmp / "nope.yaml")), "nope.yaml",
         "configs/pipeline"),
    Case("pipeline malformed override", lambda e: e.pipeline("--override", "denoiser"), "--override",
         "STAGE.KEY=VALUE"),
    Case("pipeline unknown override key", lambda e: e.pipeline("--override", "evaluat.num_samples=8"), "evaluat",
         "evaluate"),
    Case("pipeline missing stage config", lambda e: e.pipeline("--preset", str(e.write("preset.yaml", {
        "extends": str(REPO / "configs" / "pipeline" / "smoke.yaml"),
        "stages": {"vae_gan": {"config": "vae_missing.yaml"}}}))), "vae_missing.yaml", "stages.vae_gan.config"),
    Case("pipeline bad latents posterior", lambda e: e.pipeline("--override", "latents.posterior=median"),
         "stages.latents.posterior", "mode or sample"),
    Case("pipeline negative image size", lambda e: e.pipeline("--override", "image_size=-32"), "image_size", "e.g."),
    # ---- sweep
    Case("sweep unknown key", lambda e: e.sweep(_sweep(paramters={"a": [1]})), "paramters", "allowed"),
    Case("sweep zero max_parallel", lambda e: e.sweep(_sweep(max_parallel=0)), "max_parallel", "positive integer"),
    Case("sweep missing base config", lambda e: e.sweep(_sweep(config=str(e.tmp / "base.yaml"))), "base.yaml",
         "relative to where you run"),
    Case("sweep scalar parameter", lambda e: e.sweep(_sweep(parameters={"model.init_args.lr": 0.1})),
         "model.init_args.lr", "a list of values"),
    # ---- compare
    Case("compare nothing to compare", lambda e: ["compare", "--out", str(e.out)], "--group", "give run folders"),
    Case("compare missing run folder", lambda e: ["compare", str(e.tmp / "no_run"), "--out", str(e.out)], "no_run",
         "does not exist"),
    # ---- encode-latents (python -m data_pipelines)
    Case("encode-latents missing vae", lambda e: [
        "encode-latents", "--vae", str(e.tmp / "novae.ckpt"), "--in", e.files.shards, "--out", str(e.out),
        "--num-workers", "0", "--device", "cpu"], "novae.ckpt", "train that stage", entry="data_pipelines"),
    Case("encode-latents image size not a multiple of f", lambda e: [
        "encode-latents", "--vae", str(e.files.vae), "--in", e.files.shards, "--out", str(e.out), "--image-size",
        "15", "--num-workers", "0", "--device", "cpu"], "--image-size", "multiple", entry="data_pipelines"),
]


def _snapshot(*folders: Path) -> set[Path]:
    return {path for folder in folders for path in folder.rglob("*")}


def _run_in_process(argv: list[str], entry: str, capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    if entry == "data_pipelines":
        from data_pipelines.cli import main
    else:
        from lightning_diffusion.cli import main
    capfd.readouterr()
    code = main(argv)
    return code, capfd.readouterr().err


def _run_subprocess(argv: list[str], entry: str, cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", entry, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    return result.returncode, result.stderr


@pytest.fixture(autouse=True)
def _no_stage_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline case that got past validation must fail here, not train for minutes."""
    from lightning_diffusion.commands import pipeline

    def refuse(self: object, stage: str, args: list[str]) -> None:
        raise AssertionError(f"the pipeline started stage {stage}: its bad preset was not refused up front")

    monkeypatch.setattr(pipeline.Pipeline, "command", refuse)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_config_is_one_line_exit_2_and_writes_nothing(case: Case, files: Files, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    env = Env(tmp_path, files)
    argv = case.args(env)
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory lands in the snapshot
    before = _snapshot(tmp_path, files.root)
    with one_thread():
        if case.subprocess:
            code, err = _run_subprocess(argv, case.entry, tmp_path)
        else:
            code, err = _run_in_process(argv, case.entry, capfd)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.key in lines[0], f"the message does not name {case.key!r}: {lines[0]}"
    assert case.fix in lines[0], f"the message does not say the fix ({case.fix!r}): {lines[0]}"
    assert not env.run.exists() and not env.out.exists()
    assert _snapshot(tmp_path, files.root) == before, "a refused command wrote files"


def test_the_table_has_at_least_30_cases_over_every_part() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)) >= 30
    for part in ("vae", "clip", "denoiser", "data", "trainer", "sample", "evaluate", "pipeline", "sweep", "compare"):
        assert sum(name.startswith(part) for name in names) >= 2, part
    assert sum(case.subprocess for case in CASES) == 3


@pytest.mark.parametrize("stage", ["vae", "clip", "denoiser"])
def test_the_base_configs_of_the_table_train(stage: str, files: Files, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The table's cases differ from a config that trains (one step) only by the bad key; the latent denoiser also
    checks that the frozen VAE-GAN it loads keeps its own hyper-parameters under LightningCLI."""
    env = Env(tmp_path, files)
    model = {"space": "latent", "vae_checkpoint": str(files.vae)} if stage == "denoiser" else None
    monkeypatch.chdir(tmp_path)
    with one_thread():
        assert main_entry(env.fit(stage, model=model)) == 0
    assert (env.run / "checkpoints" / "epoch=0-step=1.ckpt").is_file()  # the run folder's checkpoints/


def main_entry(argv: list[str]) -> int:
    from lightning_diffusion.cli import main

    return main(argv)
