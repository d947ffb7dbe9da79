"""Classifier-free guidance weight vs sample quality and prompt fidelity, on one trained text-to-image denoiser.

For w in {1, 2, 3, 5} (1 = the plain conditional model): the Fréchet distance of samples to the held-out real
images (diversity and realism) and the CLIP score of samples against their captions (prompt fidelity), one
sample per caption of the same real images with the same seeds, DDIM 50 steps. Also writes a comparison grid:
rows = held-out and training prompts, columns = guidance weights. The usual finding (Ho & Salimans 2022) is a
trade-off: CLIP score rises with w while the Fréchet distance is best at a small w > 1.
Writes results/guidance_sweep.json, results/guidance_sweep.png (plot) and results/guidance_grid.png.

    python benchmarks/guidance_sweep.py                   # the quickstart's denoiser (runs/quickstart)
    python benchmarks/guidance_sweep.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common import add_common_arguments, environment, finish_arguments
from generation_scoring import GenerationScorer, add_scoring_arguments

WEIGHTS = (1.0, 2.0, 3.0, 5.0)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, left = plt.subplots(figsize=(6, 4))
    weights = [row["guidance"] for row in rows]
    left.plot(weights, [row["fd"] for row in rows], marker="o", color="tab:blue")
    left.set_xlabel("guidance weight w")
    left.set_ylabel("Fréchet distance (lower is better)", color="tab:blue")
    if rows[0]["clip_score"] is not None:
        right = left.twinx()
        right.plot(weights, [row["clip_score"] for row in rows], marker="s", color="tab:red")
        right.set_ylabel("CLIP score (higher is better)", color="tab:red")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def comparison_grid(scorer: GenerationScorer, prompts: list[str], weights: tuple[float, ...], steps: int,
                    samples: int, path: Path) -> None:
    """One row per (prompt, guidance weight), `samples` images wide; the same seed in every row."""
    from lightning_diffusion.diffusion.grids import image_grid, save_png

    rows = []
    for prompt in prompts:
        for weight in weights:
            rows.append(scorer.model.generate([prompt] * samples, guidance=weight, sampler="ddim", steps=steps, seed=0))
    grid = image_grid(torch.cat(rows), samples)
    save_png(grid, path)
    path.with_suffix(".txt").write_text(
        f"rows: {len(prompts)} prompts x {len(weights)} guidance weights {list(weights)}, {samples} samples each\n"
        + "\n".join(f"{p} @ w={w}" for p in prompts for w in weights) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scoring_arguments(parser)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--prompts", nargs="*", default=[
        "a 3D rendered emoji of fox", "a flat vector emoji of pizza",  # held-out: concepts of the val split
        "a 3D rendered emoji of koala", "a flat vector emoji of red apple"],  # training concepts
        help="prompts of the comparison grid (default: two held-out and two training concepts)")
    add_common_arguments(parser, repeats=1, device=False)
    args = finish_arguments(parser.parse_args(argv))
    if args.quick:
        args.num_samples, args.steps = min(args.num_samples, 16), min(args.steps, 5)
    scorer = GenerationScorer(args)
    weights = WEIGHTS[:2] if args.quick else WEIGHTS
    rows = []
    for weight in weights:
        row = scorer.score(sampler="ddim", steps=args.steps, guidance=weight)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("guidance", "nfe", "fd", "clip_score", "seconds")}), flush=True)
    out_dir = Path(__file__).parent / "results" / ("quick" if args.quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(rows, out_dir / "guidance_sweep.png")
    comparison_grid(scorer, args.prompts, weights, args.steps, 2 if args.quick else 6, out_dir / "guidance_grid.png")
    best_fd = min(rows, key=lambda row: row["fd"])
    record = {"benchmark": "guidance_sweep",
              "command": " ".join(["python", "benchmarks/guidance_sweep.py", *(sys.argv[1:] if argv is None else argv)]),
              "quick": bool(args.quick), **scorer.describe(), "sampler": f"ddim {args.steps}", "rows": rows,
              "best_fd_guidance": best_fd["guidance"], "grid": "benchmarks/results/guidance_grid.png",
              "plot": "benchmarks/results/guidance_sweep.png", "prompts": args.prompts, **environment()}
    (out_dir / "guidance_sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"benchmark": "guidance_sweep", "best_fd_guidance": best_fd["guidance"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
