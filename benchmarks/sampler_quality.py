"""P5: Fréchet distance vs number of network evaluations (NFE) for the samplers of one trained denoiser.

DDPM ancestral sampling with all 1000 steps is the reference; DDIM (eta 0) at 10/25/50/100 steps and the
probability-flow ODE with Euler and Heun steps (Karras grid) use a fraction of the evaluations. Every setting
draws one sample per caption of the same held-out real images with the same seeds and the same guidance weight.
Ratio: the best Fréchet distance reachable with <= 25 evaluations over DDPM-1000's; target <= 1.10 (within 10 %).
Writes results/sampler_quality.json and a plot results/sampler_quality.png.

    python benchmarks/sampler_quality.py                  # the quickstart's denoiser (runs/quickstart), 256 samples
    python benchmarks/sampler_quality.py --ckpt C --clip-ckpt K --num-samples 512
    python benchmarks/sampler_quality.py --quick          # 16 samples, few settings: a smoke check
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import add_common_arguments, finish_arguments, write_result
from generation_scoring import GenerationScorer, add_scoring_arguments

FULL = [("ddpm", 1000), ("ddim", 10), ("ddim", 25), ("ddim", 50), ("ddim", 100),
        ("euler", 10), ("euler", 25), ("euler", 50), ("heun", 5), ("heun", 13), ("heun", 25)]
QUICK = [("ddpm", 20), ("ddim", 5), ("heun", 3)]
BUDGET = 25


def plot(rows: list[dict], reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for sampler in dict.fromkeys(row["sampler"] for row in rows):
        points = sorted((row["nfe"], row["fd"]) for row in rows if row["sampler"] == sampler)
        axis.plot(*zip(*points), marker="o", label=sampler)
    axis.axhline(reference["fd"] * 1.1, color="grey", linestyle="--", linewidth=1, label="DDPM-1000 + 10 %")
    axis.axvline(BUDGET, color="grey", linestyle=":", linewidth=1)
    axis.set_xscale("log")
    axis.set_xlabel("network evaluations per sample (log)")
    axis.set_ylabel("Fréchet distance (lower is better)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scoring_arguments(parser)
    parser.add_argument("--guidance", type=float, default=3.0, help="CFG weight of every setting")
    add_common_arguments(parser, repeats=1, device=False)
    args = finish_arguments(parser.parse_args(argv))
    if args.quick:
        args.num_samples = min(args.num_samples, 16)
    scorer = GenerationScorer(args)
    rows = []
    for sampler, steps in QUICK if args.quick else FULL:
        row = {"sampler": sampler, "steps": steps,
               **scorer.score(sampler=sampler, steps=steps, guidance=args.guidance)}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("sampler", "steps", "nfe", "fd", "clip_score", "seconds")}), flush=True)
    reference = next(row for row in rows if row["sampler"] == "ddpm")
    cheap = [row for row in rows if row["nfe"] <= BUDGET and row["sampler"] != "ddpm"]
    best = min(cheap, key=lambda row: row["fd"])
    out_dir = (Path(__file__).parent / "results" / ("quick" if args.quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(rows, reference, out_dir / "sampler_quality.png")
    result = {**scorer.describe(), "guidance": args.guidance, "reference": f"ddpm {reference['steps']}",
              "best_within_budget": f"{best['sampler']} {best['steps']} steps ({best['nfe']} NFE)",
              "nfe_budget": BUDGET, "rows": rows, "plot": "benchmarks/results/sampler_quality.png"}
    write_result("sampler_quality", args, result, ratio=best["fd"] / reference["fd"], target="<= 1.1",
                 ratio_definition=f"best Fréchet distance with <= {BUDGET} evaluations / DDPM-{reference['steps']}'s",
                 summary=("best_within_budget",))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
