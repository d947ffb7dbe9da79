"""P5 / P5b: Fréchet distance vs number of network evaluations (NFE) for the samplers of one trained denoiser.

DDPM ancestral sampling with all 1000 steps is the reference; DDIM (eta 0; leading or trailing timesteps), the
probability-flow ODE with Euler and Heun steps (Karras grid), DPM-Solver++(2M) (Karras grid, or the schedule's own
timesteps with trailing spacing, `grid=discrete`) and its SDE variant, Euler ancestral and EDM's stochastic sampler
(S_churn 40) use a fraction of the evaluations. Every setting draws one sample per caption of the same held-out
real images with the same per-sample seeds and the same guidance weight.
P5 ratio: the best Fréchet distance reachable with <= 25 evaluations over DDPM-1000's; target <= 1.10.
P5b ratio: the same with <= 5 evaluations (the few-step solvers' claim); target <= 1.10.
Writes results/sampler_quality.json and a plot results/sampler_quality.png.

    python benchmarks/sampler_quality.py                  # the quickstart's denoiser (runs/quickstart), 256 samples
    python benchmarks/sampler_quality.py --ckpt C --clip-ckpt K --num-samples 512
    python benchmarks/sampler_quality.py --quick          # 16 samples, few settings: a smoke check
    python benchmarks/sampler_quality.py --reuse results/sampler_quality.json   # score only new settings
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import add_common_arguments, finish_arguments, write_result
from generation_scoring import GenerationScorer, add_scoring_arguments

CHURN = {"s_churn": 40.0}
TRAILING, DISCRETE = {"spacing": "trailing"}, {"grid": "discrete"}  # DISCRETE: the schedule's steps, trailing
FULL = [("ddpm", 1000, {}), ("ddim", 5, {}), ("ddim", 5, TRAILING), ("ddim", 10, {}), ("ddim", 25, {}),
        ("ddim", 50, {}), ("ddim", 100, {}),
        ("euler", 10, {}), ("euler", 25, {}), ("euler", 50, {}), ("heun", 5, {}), ("heun", 13, {}), ("heun", 25, {}),
        ("dpmpp_2m", 3, {}), ("dpmpp_2m", 4, {}), ("dpmpp_2m", 5, {}), ("dpmpp_2m", 10, {}), ("dpmpp_2m", 25, {}),
        ("dpmpp_2m", 3, DISCRETE), ("dpmpp_2m", 4, DISCRETE), ("dpmpp_2m", 5, DISCRETE), ("dpmpp_2m", 10, DISCRETE),
        ("dpmpp_2m_sde", 10, {}), ("dpmpp_2m_sde", 25, {}), ("euler_ancestral", 5, DISCRETE),
        ("euler_ancestral", 10, {}), ("euler_ancestral", 25, {}),
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


def setting_key(sampler: str, steps: int, options: dict) -> str:
    return json.dumps([sampler, steps, options], sort_keys=True)


def reusable_rows(args: argparse.Namespace, scorer: GenerationScorer, settings: list) -> dict[str, dict]:
    """The rows of `args.reuse` that this run would measure again, if they provably would give the same numbers:
    its cheapest shared row is scored again and must match exactly (FD and CLIP score to the stored decimals)."""
    earlier = json.loads(args.reuse.read_text())
    same_setup = all(earlier.get(k) == v for k, v in (("num_samples", args.num_samples), ("guidance", args.guidance),
                                                        ("data", args.data), ("encoder", scorer.suite.encoder.name)))
    wanted = {setting_key(s, n, o) for s, n, o in settings}
    rows = {setting_key(r["sampler"], r["steps"], r.get("options") or {}): r for r in earlier["rows"]}
    rows = {key: row for key, row in rows.items() if key in wanted}
    if not same_setup or not rows:
        raise SystemExit(f"--reuse {args.reuse}: other samples, guidance, data or encoder, or no shared setting")
    check = min(rows.values(), key=lambda r: r["nfe"])
    again = scorer.score(sampler=check["sampler"], steps=check["steps"], guidance=args.guidance,
                         **(check.get("options") or {}))
    if (again["fd"], again["clip_score"]) != (check["fd"], check["clip_score"]):
        raise SystemExit(f"--reuse {args.reuse}: {label(check)} {check['steps']} steps scores {again['fd']} / "
                         f"{again['clip_score']} here, {check['fd']} / {check['clip_score']} there: another model or "
                         "code; run without --reuse")
    args.reused = {"from": str(args.reuse), "rows": len(rows), "check": f"{label(check)} {check['steps']} steps "
                   f"re-scored: FD {again['fd']}, CLIP score {again['clip_score']} (equal)"}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scoring_arguments(parser)
    parser.add_argument("--guidance", type=float, default=3.0, help="CFG weight of every setting")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="an earlier result JSON: its rows are kept if re-scoring its cheapest row here gives "
                             "the same numbers (same model, data, seeds and code); only new settings are scored")
    add_common_arguments(parser, repeats=1, device=False)
    args = finish_arguments(parser.parse_args(argv))
    if args.quick:
        args.num_samples = min(args.num_samples, 16)
    scorer = GenerationScorer(args)
    settings = QUICK if args.quick else FULL
    stored = reusable_rows(args, scorer, settings) if args.reuse else {}
    rows = []
    for sampler, steps, options in settings:
        key = setting_key(sampler, steps, options)
        row = stored.get(key) or {"sampler": sampler, "steps": steps, "options": options,
                                  **scorer.score(sampler=sampler, steps=steps, guidance=args.guidance, **options)}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("sampler", "steps", "options", "nfe", "fd", "clip_score", "seconds")}
                         | {"reused": key in stored}), flush=True)
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
              "nfe_budget": BUDGET, "p5b": p5b, "rows": rows, "plot": "benchmarks/results/sampler_quality.png",
              **({"reused": args.reused} if args.reuse else {})}
    write_result("sampler_quality", args, result, ratio=best["fd"] / reference["fd"], target="<= 1.1",
                 ratio_definition=f"best Fréchet distance with <= {BUDGET} evaluations / DDPM-{reference['steps']}'s",
                 summary=("best_within_budget", "p5b"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
