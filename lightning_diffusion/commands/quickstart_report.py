"""The report folder of the `pipeline` command: metrics JSON + markdown, grids and metric-vs-step plots.

Everything is read back from what the stages wrote (checkpoints, the `evaluate` JSON files, the runs' CSV logs),
so the report can be rebuilt from a finished run folder. Sample grids come from the `sample` command itself,
run in-process with the command line written into the markdown.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import torch

from lightning_diffusion.errors import UserError

CURVES = re.compile(r"^(train/loss|train/rec|val/.*)$")
SKIP_CURVES = re.compile(r"^val/loss_t|/samples$")  # per-timestep losses (val/loss sums them up), sample counts


def _val_images(data_dir: Path, split: str, count: int, image_size: int) -> dict[str, Any]:
    """The first `count` samples of a split (shard order), through the shared DataModule."""
    from data_pipelines.datamodule import ShardDataModule

    urls = str(data_dir / f"{split}-*.tar")
    data = ShardDataModule(train_urls=urls, val_urls=urls, image_size=image_size, batch_size=count, num_workers=0,
                           shuffle_buffer=0, persistent_workers=False)
    data.setup("validate")
    return next(iter(data.val_dataloader()))


def pick_prompts(data_dir: Path, per_split: int) -> tuple[list[str], list[str]]:
    """The first `per_split` distinct captions of the validation (held-out concepts) and training shards."""
    from data_pipelines.shard_counts import shard_sample_counts
    from data_pipelines.urls import resolve_shards

    picked = []
    for split in ("val", "train"):
        urls = resolve_shards(str(data_dir / f"{split}-*.tar"), f"{split} shards")
        total = sum(shard_sample_counts(urls, f"{split} shards"))
        captions = _val_images(data_dir, split, min(total, 64), 16)["caption"]
        distinct = list(dict.fromkeys(captions))[:per_split]
        if not distinct:
            raise UserError(f"no captions in {data_dir}/{split}-*.tar: rebuild the shards")
        picked.append(distinct)
    return picked[0], picked[1]


def reconstruction_grid(vae_ckpt: Path, data_dir: Path, image_size: int, path: Path, count: int = 8) -> None:
    """Held-out images (top row) over their VAE-GAN reconstructions (posterior mean; bottom row)."""
    from lightning_diffusion.autoencoder import VAEGAN
    from lightning_diffusion.diffusion.grids import image_grid, save_png

    from data_pipelines.shard_counts import shard_sample_counts
    from data_pipelines.urls import resolve_shards

    urls = resolve_shards(str(data_dir / "val-*.tar"), "val shards")
    count = min(count, sum(shard_sample_counts(urls, "val shards")))
    images = _val_images(data_dir, "val", count, image_size)["image"]
    vae = VAEGAN.load_frozen(vae_ckpt)
    save_png(image_grid(torch.cat([images, vae.reconstruct(images)]), columns=count), path)


def sample_grid(ckpt: Path, prompts: list[str], spec: dict[str, Any], path: Path) -> str:
    """Rows of (prompt, guidance) from the `sample` command, run in-process; returns its command line."""
    import argparse

    from lightning_diffusion.commands import sample

    argv = ["--ckpt", str(ckpt), *(x for p in prompts for x in ("--prompt", p)),
            "--guidance", *(f"{g:g}" for g in spec.get("guidance", [1.0, 3.0])),
            "--n", str(spec.get("samples_per_prompt", 4)), "--steps", str(spec.get("steps", 50)),
            "--device", "cpu", "--out", str(path)]
    parser = argparse.ArgumentParser()
    sample.add_arguments(parser)
    sample.run(parser.parse_args(argv))
    return shlex.join(["python", "-m", "lightning_diffusion", "sample", *argv])


def stage_curves(stage_dir: Path, out: Path, stage: str) -> tuple[list[Path], dict[str, float]]:
    """Metric-vs-step plots of a stage's CSV log (compare's plotting) and the last logged value of each metric."""
    from lightning_diffusion.commands.compare import _file_name, plot_curves
    from lightning_diffusion.training.run_logs import read_csv_run

    logs = sorted(stage_dir.glob("csv/*/metrics.csv"))
    if not logs:
        return [], {}
    run = read_csv_run(logs[-1])
    run.name = stage
    plots, finals = [], {}
    for metric, points in sorted(run.history.items()):
        if not CURVES.match(metric) or SKIP_CURVES.match(metric) or not points:
            continue
        finals[metric] = points[-1][1]
        path = out / f"curve_{stage}_{_file_name(metric)}.png"
        plot_curves([run], metric, path)
        plots.append(path)
    return plots, finals


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]


def write_report(pipeline: Any, heldout: list[str], train: list[str]) -> None:  # noqa: ANN401 - the Pipeline
    """Write `<out>/report/`: metrics.json, report.md, reconstructions.png, samples_*.png and curve_*.png."""
    out = pipeline.stage_dir("report")
    spec = pipeline.preset["stages"]["report"]
    size = pipeline.preset["image_size"]
    reconstruction_grid(pipeline.checkpoint("vae_gan"), pipeline.data_dir, size, out / "reconstructions.png")
    commands = {name: sample_grid(pipeline.checkpoint("denoiser"), prompts, spec, out / f"samples_{name}.png")
                for name, prompts in (("heldout", heldout), ("train", train))}
    evaluation = {name: json.loads((pipeline.stage_dir("evaluate") / f"{name}.json").read_text())
                  for name in ("vae_gan", "denoiser")}
    curves, logged = {}, {}
    for stage in ("vae_gan", "clip", "denoiser"):
        curves[stage], logged[stage] = stage_curves(pipeline.stage_dir(stage), out, stage)
    metrics = {
        "preset": pipeline.preset, "stage_seconds": dict(pipeline.seconds),
        "evaluation": {name: {"metrics": e["metrics"], "encoder": e["encoder"], "num_samples": e["num_samples"]}
                       for name, e in evaluation.items()},
        "last_logged": logged, "prompts": {"heldout": heldout, "train": train},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")

    lines = [f"# Quickstart report: {pipeline.out}", "", "## Stage wall times", ""]
    lines += _table([(s, f"{t:.0f} s") for s, t in pipeline.seconds.items()], ("stage", "seconds"))
    for name, title in (("vae_gan", "VAE-GAN reconstructions"), ("denoiser", "Denoiser samples")):
        e = evaluation[name]
        lines += ["", f"## {title} (`evaluate`, {e['num_samples']} held-out images, encoder {e['encoder']})", ""]
        lines += _table([(k, f"{v:.4f}") for k, v in e["metrics"].items()], ("metric", "value"))
    lines += ["", "## Last logged values", ""]
    lines += _table([(f"{stage} {k}", f"{v:.4g}") for stage, values in logged.items() for k, v in values.items()],
                    ("metric", "value"))
    lines += ["", "## Reconstructions (top: held-out images, bottom: VAE-GAN)", "", "![](reconstructions.png)"]
    for name, prompts in (("heldout", heldout), ("train", train)):
        lines += ["", f"## Samples, {name} prompts: one row per (prompt, guidance)", "",
                  f"![](samples_{name}.png)", "", f"`{commands[name]}`", "",
                  *(f"- {row}" for row in (out / f"samples_{name}.txt").read_text().splitlines()[1:])]
    lines += ["", "## Curves", ""]
    lines += [f"![]({path.name})" for paths in curves.values() for path in paths]
    (out / "report.md").write_text("\n".join(lines) + "\n")
