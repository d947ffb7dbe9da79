"""`pipeline --preset quickstart --out runs/quickstart`: the whole latent text-to-image chain in one command.

Stages, in order: `data` (build the emoji shards when their manifest is missing), `vae_gan`, `clip` (each the plain
`python -m lightning_diffusion fit --config <stage config> <overrides>` in a subprocess), `latents`
(`python -m lightning_diffusion encode-latents --text-encoder` for the train and val shards), `denoiser` (fit on the latent shards, the
frozen VAE-GAN and CLIP text tower passed by `--model.init_args.*_checkpoint`), `evaluate` (the `evaluate` command
on both checkpoints) and `report` (metrics JSON + markdown, grids, curves; `lightning_diffusion.commands.quickstart_report`).

A preset is a YAML file in `configs/pipeline/` (`extends:` another one and overrides its keys): the stage configs,
their dotted overrides and the settings of the other stages. Each stage writes into `<out>/<stage>/`, logs its
subprocess output to `log.txt` and its command lines to `command.txt` (to rerun one alone), and is finished when
its outputs and `done.json` exist; a finished stage is skipped, an unfinished one is started again from scratch
(its folder is cleared first), and a stage that runs makes every later one run again (their inputs changed).
`--force STAGE` reruns that stage and every stage after it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_diffusion.commands.pipeline_presets import STAGES, apply_override, check_preset, find_file, load_preset
from lightning_diffusion.errors import UserError

DONE = "done.json"
OWNED = ".written-by-pipeline"
# Lightning's default (rich) bar draws nothing until the end when its output is a pipe, as the stages' output is
# here (it goes to the terminal and to <stage>/log.txt): tqdm's bar updates a line there every `refresh_rate` steps.
PROGRESS_BAR = {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 10}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quickstart",
                        help="a name in configs/pipeline/ (quickstart, smoke) or a YAML file (default quickstart)")
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="run folder (default runs/quickstart)")
    parser.add_argument("--force", action="append", default=[], choices=[*STAGES, "all"],
                        help="rerun this stage and every later one, even when finished (repeatable)")
    parser.add_argument("--data", type=Path, default=None, help="emoji shard folder (default: the preset's data.dir)")
    parser.add_argument("--override", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="change the preset: `denoiser.trainer.max_steps=100` (a fit stage's dotted override), "
                             "`evaluate.num_samples=64`, `image_size=32`, `data.limit=30`; VALUE is YAML (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="write the stages' output only to their log.txt")


# ----------------------------------------------------------------------------------------------------- running
def check_own_folder(folder: Path) -> None:
    """Refuse a non-empty `<out>/<stage>` folder the pipeline did not make (its record: `OWNED`, or the `DONE`
    marker of a finished stage): the pipeline may clear its stage folders, never a folder of the user's."""
    if folder.is_dir() and any(folder.iterdir()) and not ((folder / OWNED).is_file() or (folder / DONE).is_file()):
        raise UserError(f"--out: '{folder}' exists and was not written by the pipeline (no {OWNED} in it), so it is "
                        "not touched: choose another --out, or move that folder away")


def remove_own_folder(folder: Path) -> None:
    """Delete a stage folder before its stage reruns, only if the pipeline made it (see `check_own_folder`)."""
    check_own_folder(folder)
    shutil.rmtree(folder)


class StageFailed(UserError):
    """A stage's subprocess failed; its folder has no done marker, so the next call starts it again."""


@dataclass
class Pipeline:
    """One chain run: the preset, where things go, and what has to be rerun."""

    preset: dict[str, Any]
    out: Path
    data_dir: Path
    forced_from: int | None = None
    quiet: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def checkpoint(self, stage: str) -> Path:
        """`<stage folder>/checkpoints/last.ckpt`: the stage folder is the fit's `trainer.default_root_dir`."""
        return self.stage_dir(stage) / "checkpoints" / "last.ckpt"

    # --------------------------------------------------------------------------------------------- bookkeeping
    def finished(self, stage: str, outputs: list[Path]) -> bool:
        forced = self.forced_from is not None and STAGES.index(stage) >= self.forced_from
        return not forced and (self.stage_dir(stage) / DONE).is_file() and all(p.exists() for p in outputs)

    def stage(self, stage: str, outputs: list[Path], body: Callable[[], None], clear: bool = True) -> None:
        """Run `body` unless the stage is finished; record the done marker (with the wall time) when it succeeds."""
        folder = self.stage_dir(stage)
        if self.finished(stage, outputs):
            self.seconds[stage] = json.loads((folder / DONE).read_text()).get("seconds", 0.0)
            print(f"[pipeline] {stage}: finished earlier, skipped ({folder / DONE})", file=sys.stderr)
            return
        if clear and folder.exists():
            remove_own_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / OWNED).touch()  # the record that this folder is the pipeline's to clear on a rerun
        (folder / DONE).unlink(missing_ok=True)
        print(f"[pipeline] {stage}: running (log: {folder / 'log.txt'})", file=sys.stderr)
        started = time.perf_counter()
        body()
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise StageFailed(f"stage {stage} ended without writing {', '.join(missing)}; see {folder / 'log.txt'}")
        self.seconds[stage] = round(time.perf_counter() - started, 1)
        # every later stage consumed the old outputs of this one (checkpoints, latents, shards): rerun them too
        later = STAGES.index(stage) + 1
        self.forced_from = later if self.forced_from is None else min(self.forced_from, later)
        done = {"stage": stage, "seconds": self.seconds[stage], "outputs": [str(p) for p in outputs]}
        tmp = folder / (DONE + ".tmp")
        tmp.write_text(json.dumps(done, indent=2) + "\n")
        os.replace(tmp, folder / DONE)
        print(f"[pipeline] {stage}: done in {self.seconds[stage]:.0f} s", file=sys.stderr)

    def command(self, stage: str, args: list[str]) -> None:
        """Run one command, its output to `<stage>/log.txt` (and the terminal); its line to `command.txt`."""
        folder = self.stage_dir(stage)
        with open(folder / "command.txt", "a") as handle:
            handle.write(shlex.join(args) + "\n")
        with open(folder / "log.txt", "ab") as log:
            log.write(f"$ {shlex.join(args)}\n".encode())
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # progress reaches the log as it happens
            process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            assert process.stdout is not None
            while chunk := process.stdout.read1(1 << 16):
                log.write(chunk)
                if not self.quiet:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.buffer.flush()
            code = process.wait()
        if code != 0:
            raise StageFailed(f"stage {stage} failed (exit status {code}) running `{shlex.join(args[1:4])} ...`; "
                              f"see {folder / 'log.txt'}, fix it and run the pipeline again (finished stages are kept)")

    # --------------------------------------------------------------------------------------------- fit stages
    def fit_args(self, stage: str, automatic: dict[str, Any]) -> list[str]:
        """`fit --config <stage config>` with the chain's overrides, then the preset's (which win)."""
        spec = self.preset["stages"][stage]
        config = find_file(spec["config"], f"stages.{stage}.config")
        base = yaml.safe_load(config.read_text()) or {}
        folder = self.stage_dir(stage)
        overrides = {
            "trainer.default_root_dir": str(folder),
            "trainer.callbacks": checkpoint_callbacks(base) + self.sample_metrics(stage)
            + [PROGRESS_BAR],
            "trainer.logger": self.loggers(stage),
            **automatic,
            **(spec.get("overrides") or {}),
        }
        return [sys.executable, "-m", "lightning_diffusion", "fit", "--config", str(config),
                *(f"--{key}={cli_value(value)}" for key, value in overrides.items())]

    def sample_metrics(self, stage: str) -> list[dict[str, Any]]:
        """The denoiser's `SampleMetrics` callback (Fréchet distance and CLIP score of samples vs training steps,
        on the held-out concepts) when the preset asks for it under `stages.denoiser.sample_metrics`."""
        spec = self.preset["stages"][stage].get("sample_metrics") if stage == "denoiser" else None
        if not spec:
            return []
        if not isinstance(spec, dict):
            raise UserError("stages.denoiser.sample_metrics must be a mapping of SampleMetrics arguments, e.g. "
                            "{num_samples: 256, every_n_steps: 500}")
        init_args = {"data": self.shards("val"), "clip_checkpoint": str(self.checkpoint("clip")), **spec}
        init_args["num_samples"] = min(int(init_args.get("num_samples", 256)), val_count(self.data_dir))
        return [{"class_path": "lightning_diffusion.diffusion.sample_metrics.SampleMetrics", "init_args": init_args}]

    def loggers(self, stage: str) -> list[dict[str, Any]]:
        """W&B (the project's default; left out under WANDB_MODE=disabled) and a CSV log the report plots from."""
        loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(self.stage_dir(stage)), "name": "csv", "version": 0}}]
        if os.environ.get("WANDB_MODE", "").lower() != "disabled":
            loggers.insert(0, {"class_path": "lightning_diffusion.training.tracking.ProjectWandbLogger",
                               "init_args": {"project": "lightning_diffusion", "group": self.out.name, "name": stage}})
        return loggers

    def shards(self, split: str) -> str:
        return str(self.data_dir / f"{split}-*.tar")

    def image_data(self) -> dict[str, Any]:
        return {"data.init_args.train_urls": self.shards("train"), "data.init_args.val_urls": self.shards("val")}

    # --------------------------------------------------------------------------------------------- the chain
    def run(self) -> None:
        from lightning_diffusion.commands.quickstart_report import pick_prompts, write_report

        for stage in STAGES:  # before any stage runs: a folder of the user's under --out stops the whole run
            check_own_folder(self.stage_dir(stage))
        size = self.preset["image_size"]
        self.build_data()
        self.stage("vae_gan", [self.checkpoint("vae_gan")], lambda: self.command("vae_gan", self.fit_args(
            "vae_gan", {**self.image_data(), "data.init_args.image_size": size, "model.init_args.image_size": size})))
        self.stage("clip", [self.checkpoint("clip")], lambda: self.command("clip", self.fit_args(
            "clip", self.image_data())))
        self.stage("latents", [self.stage_dir("latents") / "manifest.json"], self.encode_latents)
        heldout, train = pick_prompts(self.data_dir, self.preset["stages"]["report"].get("prompts_per_split", 2))
        latents = self.stage_dir("latents")
        self.stage("denoiser", [self.checkpoint("denoiser")], lambda: self.command("denoiser", self.fit_args(
            "denoiser", {
                "data.init_args.train_urls": str(latents / "train-*.tar"),
                "data.init_args.val_urls": str(latents / "val-*.tar"),
                "data.init_args.image_keys": [],
                "data.init_args.tensor_keys": ["latent.npy", "text_emb.npy", "text_pooled.npy"],
                "data.init_args.image_size": size, "model.init_args.image_size": size,
                "model.init_args.space": "latent", "model.init_args.vae_checkpoint": str(self.checkpoint("vae_gan")),
                "model.init_args.text_encoder": "clip", "model.init_args.clip_checkpoint": str(self.checkpoint("clip")),
                "model.init_args.heldout_prompts": heldout, "model.init_args.train_prompts": train,
            })))
        evaluations = [self.stage_dir("evaluate") / f"{name}.json" for name in ("vae_gan", "denoiser")]
        self.stage("evaluate", evaluations, self.evaluate)
        report = self.stage_dir("report")
        self.stage("report", [report / "metrics.json", report / "report.md"],
                   lambda: write_report(self, heldout, train))

    def build_data(self) -> None:
        spec = self.preset["data"]
        manifest = self.data_dir / "manifest.json"

        def build() -> None:
            manifest.unlink(missing_ok=True)
            args = [sys.executable, "-m", "data_pipelines", "build-emoji", "--out", str(self.data_dir),
                    "--size", str(spec.get("build_size", 64))]
            if spec.get("limit"):
                args += ["--limit", str(spec["limit"])]
            self.command("data", args)

        forced = self.forced_from == 0
        if manifest.is_file() and not forced:
            done = self.stage_dir("data") / DONE  # built by an earlier call of this run: keep its build time
            self.seconds["data"] = json.loads(done.read_text()).get("seconds", 0.0) if done.is_file() else 0.0
            print(f"[pipeline] data: {manifest} exists, not rebuilt", file=sys.stderr)
            return
        self.stage("data", [manifest], build)

    def encode_latents(self) -> None:
        spec = self.preset["stages"]["latents"]
        posterior = spec.get("posterior", "mode")
        if posterior not in ("mode", "sample"):
            raise UserError(f"stages.latents.posterior must be mode or sample, got {posterior!r}")
        for split in ("train", "val"):
            self.command("latents", [
                sys.executable, "-m", "lightning_diffusion", "encode-latents", "--vae", str(self.checkpoint("vae_gan")),
                "--text-encoder", str(self.checkpoint("clip")),
                "--in", self.shards(split), "--out", str(self.stage_dir("latents")), "--prefix", split,
                "--image-size", str(self.preset["image_size"]), "--batch-size", str(spec.get("batch_size", 64)),
                f"--{posterior}",
            ])

    def evaluate(self) -> None:
        spec = self.preset["stages"]["evaluate"]
        count = val_count(self.data_dir)
        samples = min(int(spec.get("num_samples", 256)), count)
        common = ["--data", self.shards("val"), "--num-samples", str(samples),
                  "--batch-size", str(min(int(spec.get("batch_size", 32)), samples)), "--kid-subset-size", str(samples),
                  "--encoder", str(spec.get("encoder", "auto"))]
        folder = self.stage_dir("evaluate")
        self.command("evaluate", [sys.executable, "-m", "lightning_diffusion", "evaluate", "--ckpt",
                                  str(self.checkpoint("vae_gan")), "--metrics", spec.get("vae_metrics", "psnr,ssim"),
                                  *common, "--out", str(folder / "vae_gan.json")])
        self.command("evaluate", [sys.executable, "-m", "lightning_diffusion", "evaluate", "--ckpt",
                                  str(self.checkpoint("denoiser")), "--metrics",
                                  spec.get("denoiser_metrics", "fid,clip_score"), "--clip-ckpt",
                                  str(self.checkpoint("clip")), *common, "--out", str(folder / "denoiser.json")])


def checkpoint_callbacks(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The stage config's callbacks with every ModelCheckpoint writing into the run folder's `checkpoints/` (no
    `dirpath`: the CLI puts them under `trainer.default_root_dir`, the stage folder), and `last.ckpt` = the final
    weights.

    Lightning 2.6 writes `last.ckpt` of a monitored ModelCheckpoint only when that validation also wrote a top-k
    file, and not again at the end: a run whose last validation is not its best keeps a stale `last.ckpt` (found
    when the quickstart scored its step-4000 denoiser after 5000 steps; docs/gotchas.md). So monitored checkpoints
    keep only their best files here, and an unmonitored one (`save_top_k: 0`) writes `last.ckpt` when training ends.
    """
    callbacks = [dict(c) for c in ((config.get("trainer") or {}).get("callbacks") or []) if isinstance(c, dict)]
    has_last = False
    for callback in callbacks:
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            args = {**(callback.get("init_args") or {}), "enable_version_counter": False}
            args.pop("dirpath", None)
            monitored = args.get("monitor") is not None
            args["save_last"] = not monitored
            has_last = has_last or not monitored
            callback["init_args"] = args
    if not has_last:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"save_last": True, "save_top_k": 0, "enable_version_counter": False}})
    return callbacks


def cli_value(value: Any) -> str:  # noqa: ANN401 - any YAML value
    """A LightningCLI command-line value: strings as they are, anything else as JSON."""
    return str(value) if isinstance(value, (str, Path)) else json.dumps(value)


def val_count(data_dir: Path) -> int:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return int(manifest["counts"]["val"]["total"])


def run(args: argparse.Namespace) -> int:
    preset = load_preset(args.preset)
    for text in args.override:
        apply_override(preset, text)
    check_preset(preset, args.preset)
    data_dir = (args.data or Path(preset["data"].get("dir", "data/emoji"))).resolve()
    forced = min((0 if f == "all" else STAGES.index(f) for f in args.force), default=None)
    pipeline = Pipeline(preset, args.out.resolve(), data_dir, forced, args.quiet)
    started = time.perf_counter()
    pipeline.run()
    total = time.perf_counter() - started
    times = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in pipeline.seconds.items())
    print(f"[pipeline] finished in {total:.0f} s ({times}); report: {pipeline.stage_dir('report') / 'report.md'}",
          file=sys.stderr)
    return 0
