"""Classifier guidance on the 32 px emoji: how well a noisy-image classifier reads the style (3D vs flat) at each
noise level, and how strongly its gradient steers an unconditional denoiser's samples towards a wanted style.

Trains what is missing with the project's own `fit` (one thread each): the unconditional pixel denoiser
(configs/denoiser/pixel_uncond_tiny.yaml, --denoiser-steps), the guiding classifier (configs/classifier/tiny.yaml,
seed 0) and an independently trained judge (the same config with seed 1: other initialisation, data order and
noise draws). Then measures on the val split (concepts never seen in training) the accuracy of both classifiers per
bucket of t, and samples --samples images per label with DDIM at classifier scales s in {0, 1, 3, 10} from the same
seeds; a guided sample counts as correct when the judge, at t = 0, gives it the label it was steered to (the guiding
classifier's own verdict is reported too, but it is biased: the samples were optimised against it).
Writes results/classifier_guidance.json and results/classifier_guidance.png (rows: s x label).

    python benchmarks/classifier_guidance.py           # ~19 CPU-minutes on one thread (training: ~17)
    python benchmarks/classifier_guidance.py --quick   # tiny: 20 training steps each, results/quick/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, add_common_arguments, environment, finish_arguments

SCALES = (0.0, 1.0, 3.0, 10.0)
STYLES = ("3d", "flat")


def fit(config: Path, root: Path, steps: int, seed: int, extra: tuple[str, ...] = ()) -> Path:
    """Train with `python -m lightning_diffusion fit` unless `root/checkpoints/last.ckpt` exists; the config's run
    folder is rewritten to `root` (a derived config beside it), the seed set for the model and the data. One
    validation, at the last step, writes last.ckpt (validation draws its own noise: training is unaffected)."""
    checkpoint = root / "checkpoints" / "last.ckpt"
    if checkpoint.is_file():
        print(f"using {checkpoint}", flush=True)
        return checkpoint
    text = (ROOT / config).read_text()
    original_root = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                         if line.strip().startswith("default_root_dir:"))
    root.mkdir(parents=True, exist_ok=True)
    derived = root / "config.benchmark.yaml"
    derived.write_text(text.replace(original_root, str(root)).replace("seed_everything: 0", f"seed_everything: {seed}"))
    command = [sys.executable, "-m", "lightning_diffusion", "fit", "--config", str(derived),
               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
               "--trainer.limit_val_batches", "1", "--data.num_workers", "0", "--data.seed", str(seed), *extra]
    print(" ".join(command), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    with (root / "fit.log").open("w") as log:
        subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return checkpoint


def val_batches(image_size: int, quick: bool):  # noqa: ANN201 - a ShardLoader
    from data_pipelines import ShardDataModule

    data = ShardDataModule(str(ROOT / "data/emoji/train-*.tar"), str(ROOT / "data/emoji/val-*.tar"),
                           image_size=image_size, batch_size=32, val_batch_size=16 if quick else 64, num_workers=0,
                           label_field="style", label_classes=list(STYLES))
    data.setup("validate")
    return list(data.val_dataloader())[: 2 if quick else None]


@torch.no_grad()
def accuracy_vs_t(classifiers: dict, batches: list, buckets: int) -> list[dict]:
    """Each classifier's val accuracy with t drawn uniformly in each bucket (the same draws for every classifier),
    and on the clean images (t = 0)."""
    first = next(iter(classifiers.values()))
    steps = first.schedule.num_timesteps
    edges = torch.linspace(0, steps, buckets + 1).round().long().tolist()
    rows = []
    for lo, hi in [(0, 1), *zip(edges[:-1], edges[1:])]:
        correct = {name: 0 for name in classifiers}
        total = 0
        generator = torch.Generator().manual_seed(lo)
        for batch in batches:
            x0, labels = batch["image"], batch["label"]
            t = torch.randint(lo, hi, (len(labels),), generator=generator)
            x_t = first.noised(x0, t, generator)
            for name, classifier in classifiers.items():
                correct[name] += int((classifier(x_t, t).argmax(-1) == labels).sum())
            total += len(labels)
        rows.append({"t": f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo), "samples": total,
                     **{f"{name}_accuracy": correct[name] / total for name in classifiers}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def guided_accuracy(denoiser, guide, judge, scales: tuple[float, ...], samples: int, steps: int) -> tuple[list, list]:
    """Samples steered to each label at each scale (same seeds), judged at t = 0 by both classifiers."""
    from lightning_diffusion.classifier.guidance import guidance_wrapper

    labels = torch.tensor([label for label in range(len(STYLES)) for _ in range(samples)])
    rows, images = [], []
    for scale in scales:
        start = time.perf_counter()
        x = denoiser.generate(num_samples=len(labels), sampler="ddim", steps=steps, seed=0,
                              model_wrapper=guidance_wrapper(denoiser, guide, labels, scale))
        seconds = time.perf_counter() - start
        zero = torch.zeros(len(labels))
        with torch.no_grad():
            verdict = {name: classifier(x, zero).argmax(-1) == labels for name, classifier in
                       (("judge", judge), ("guide", guide))}
        row = {"scale": scale, "judge_accuracy": verdict["judge"].float().mean().item(),
               "guide_accuracy": verdict["guide"].float().mean().item(),
               "judge_accuracy_per_label": {STYLES[k]: verdict["judge"][labels == k].float().mean().item()
                                            for k in range(len(STYLES))},
               "seconds": round(seconds, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        images.append(torch.cat([x[labels == k][:8] for k in range(len(STYLES))]))
    return rows, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--denoiser-steps", type=int, default=1000, help="training steps of the denoiser")
    parser.add_argument("--ema-decay", type=float, default=0.99,
                        help="the denoiser's EMA decay (the config's 0.999 averages over ~1000 steps: in a run this "
                             "short the EMA weights are still mostly the initial ones and sample noise)")
    parser.add_argument("--classifier-steps", type=int, default=600, help="training steps of each classifier")
    parser.add_argument("--samples", type=int, default=32, help="guided samples per label and scale")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--buckets", type=int, default=5, help="buckets of t for the accuracy-vs-noise table")
    parser.add_argument("--runs", type=Path, default=Path("runs/classifier_guidance"), help="where models train")
    add_common_arguments(parser, repeats=1, device=False)
    args = finish_arguments(parser.parse_args(argv))
    if args.quick:
        args.denoiser_steps = args.classifier_steps = 20
        args.samples, args.steps, args.runs = 4, 5, args.runs / "quick"
    from lightning_diffusion.classifier.module import NoisyClassifier
    from lightning_diffusion.commands.sample import load_denoiser
    from lightning_diffusion.diffusion.grids import image_grid, save_png

    runs = args.runs if args.runs.is_absolute() else ROOT / args.runs
    paths = {
        "denoiser": fit(Path("configs/denoiser/pixel_uncond_tiny.yaml"), runs / "denoiser", args.denoiser_steps, 0,
                        ("--model.init_args.ema_decay", str(args.ema_decay))),
        "guide": fit(Path("configs/classifier/tiny.yaml"), runs / "guide", args.classifier_steps, 0),
        "judge": fit(Path("configs/classifier/tiny.yaml"), runs / "judge", args.classifier_steps, 1),
    }
    denoiser = load_denoiser(paths["denoiser"])
    classifiers = {name: NoisyClassifier.load_frozen(paths[name]) for name in ("guide", "judge")}
    by_t = accuracy_vs_t(classifiers, val_batches(denoiser.hparams.image_size, args.quick), args.buckets)
    rows, images = guided_accuracy(denoiser, classifiers["guide"], classifiers["judge"], SCALES, args.samples,
                                   args.steps)
    out_dir = Path(__file__).parent / "results" / ("quick" if args.quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_png(image_grid(torch.cat(images), 8), out_dir / "classifier_guidance.png")
    record = {
        "benchmark": "classifier_guidance",
        "command": " ".join(["python", "benchmarks/classifier_guidance.py", *(sys.argv[1:] if argv is None else argv)]),
        "quick": bool(args.quick), "labels": {str(k): style for k, style in enumerate(STYLES)},
        "training": {"denoiser": f"configs/denoiser/pixel_uncond_tiny.yaml, {args.denoiser_steps} steps, EMA decay "
                                 f"{args.ema_decay}",
                     "classifiers": f"configs/classifier/tiny.yaml, {args.classifier_steps} steps, guide seed 0, "
                                    "judge seed 1"},
        "sampler": f"ddim {args.steps}", "samples_per_label": args.samples,
        "judged_by": "the independently trained judge classifier at t = 0 (guide_accuracy: the guiding classifier "
                     "itself, biased)",
        "accuracy_vs_t": by_t, "guided": rows,
        "grid": "benchmarks/results/classifier_guidance.png (rows: for each scale 8 samples steered to 3d, then 8 to "
                "flat)",
        **environment(),
    }
    (out_dir / "classifier_guidance.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"benchmark": "classifier_guidance",
                      "judge_accuracy": {row["scale"]: row["judge_accuracy"] for row in rows}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
