"""P5 / P5b: Fréchet distance vs number of network evaluations (NFE) for the samplers of one trained denoiser.

DDPM ancestral sampling with all 1000 steps is the reference; DDIM (eta 0), the probability-flow ODE with Euler
and Heun steps (Karras grid), DPM-Solver++(2M) and its SDE variant, Euler ancestral and EDM's stochastic sampler
(S_churn 40) use a fraction of the evaluations. Every setting draws one sample per caption of the same held-out
real images with the same per-sample seeds and the same guidance weight.
P5 ratio: the best Fréchet distance reachable with <= 25 evaluations over DDPM-1000's; target <= 1.10.
P5b ratio: the same with <= 5 evaluations (the few-step solvers' claim); target <= 1.10.
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

CHURN = {"s_churn": 40.0}
FULL = [("ddpm", 1000, {}), ("ddim", 10, {}), ("ddim", 25, {}), ("ddim", 50, {}), ("ddim", 100, {}),
        ("euler", 10, {}), ("euler", 25, {}), ("euler", 50, {}), ("heun", 5, {}), ("heun", 13, {}), ("heun", 25, {}),
        ("dpmpp_2m", 3, {}), ("dpmpp_2m", 4, {}), ("dpmpp_2m", 5, {}), ("dpmpp_2m", 10, {}), ("dpmpp_2m", 25, {}),
        ("dpmpp_2m_sde", 10, {}), ("dpmpp_2m_sde", 25, {}), ("euler_ancestral", 10, {}), ("euler_ancestral", 25, {}),
        ("euler_ancestral", 50, {}), ("edm", 3, CHURN), ("edm", 13, CHURN), ("edm", 25, CHURN)]
QUICK = [("ddpm", 20, {}), ("ddim", 5, {}), ("heun", 3, {}), ("dpmpp_2m", 5, {}), ("euler_ancestral", 5, {}),
         ("edm", 3, CHURN)]
BUDGET = 25
FEW = 5  # P5b


def label(row: dict) -> str:
    """The sampler and its non-default options, e.g. ``edm s_churn=40``."""
    return " ".join([row["sampler"], *(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                                       for key, value in row.get("options", {}).items())])


def best_within(rows: list[dict], budget: int) -> dict | None:
    cheap = [row for row in rows if row["nfe"] <= budget and row["sampler"] != "ddpm"]
    return min(cheap, key=lambda row: row["fd"]) if cheap else None


def plot(rows: list[dict], reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(label(row) for row in rows):
        points = sorted((row["nfe"], row["fd"]) for row in rows if label(row) == name)
        axis.plot(*zip(*points), marker="o", label=name)
    axis.axhline(reference["fd"] * 1.1, color="grey", linestyle="--", linewidth=1, label="DDPM-1000 + 10 %")
    axis.axvline(BUDGET, color="grey", linestyle=":", linewidth=1)
    axis.axvline(FEW, color="grey", linestyle=":", linewidth=1)
    axis.set_xscale("log")
    axis.set_xlabel("network evaluations per sample (log)")
    axis.set_ylabel("Fréchet distance (lower is better)")
    axis.legend(fontsize=7)
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
    for sampler, steps, options in QUICK if args.quick else FULL:
        row = {"sampler": sampler, "steps": steps, "options": options,
               **scorer.score(sampler=sampler, steps=steps, guidance=args.guidance, **options)}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("sampler", "steps", "options", "nfe", "fd", "clip_score", "seconds")}),
              flush=True)
    reference = next(row for row in rows if row["sampler"] == "ddpm")
    best, few = best_within(rows, BUDGET), best_within(rows, FEW)
    p5b = None if few is None else {
        "ratio": round(few["fd"] / reference["fd"], 3), "target": "<= 1.1",
        "passed": few["fd"] / reference["fd"] <= 1.1,
        "best": f"{label(few)} {few['steps']} steps ({few['nfe']} NFE)",
        "ratio_definition": f"best Fréchet distance with <= {FEW} evaluations / DDPM-{reference['steps']}'s"}
    out_dir = (Path(__file__).parent / "results" / ("quick" if args.quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(rows, reference, out_dir / "sampler_quality.png")
    result = {**scorer.describe(), "guidance": args.guidance, "reference": f"ddpm {reference['steps']}",
              "best_within_budget": f"{label(best)} {best['steps']} steps ({best['nfe']} NFE)",
              "nfe_budget": BUDGET, "p5b": p5b, "rows": rows, "plot": "benchmarks/results/sampler_quality.png"}
    write_result("sampler_quality", args, result, ratio=best["fd"] / reference["fd"], target="<= 1.1",
                 ratio_definition=f"best Fréchet distance with <= {BUDGET} evaluations / DDPM-{reference['steps']}'s",
                 summary=("best_within_budget", "p5b"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
