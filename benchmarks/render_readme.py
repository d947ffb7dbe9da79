"""Write the README's results section from the measurements, so no number in it is typed by hand.

Reads benchmarks/results/*.json (written by the benchmarks) and a quickstart run's report (its metrics.json and
sample grids). The quickstart's numbers and grids are first copied into the repository
(benchmarks/results/quickstart.json, docs/results/*.png), so the section can be regenerated from committed files
alone. Replaces everything between the README's `<!-- results:start -->` and `<!-- results:end -->` markers.

    python benchmarks/render_readme.py --quickstart runs/quickstart   # after `make quickstart` and `make bench`
    python benchmarks/render_readme.py                                # from the committed copies only
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
BENCHMARKS = [  # (file, what is compared)
    ("lightning_overhead", "P1: Lightning `fit` of the denoiser vs a hand-written loop (seconds/step)"),
    ("unet_vs_diffusers", "P2: our U-Net training step vs diffusers' `UNet2DConditionModel`, same structure "
                          "(`feed_forward: true`) and matched size"),
    ("data_throughput", "P3: `ShardDataModule` vs a raw PIL decode loop (samples/s)"),
    ("latents_vs_on_the_fly", "P4: denoiser epoch on pre-encoded latents + text vs encoding on the fly (quickstart's "
                              "32 px models)"),
    ("latents_vs_on_the_fly_ldm", "P4 at the GPU presets' sizes: kl-f8 VAE-GAN at 256 px, ViT-B-32 text tower, "
                                  "166M-parameter `ldm_base` U-Net"),
    ("sampler_quality", "P5: best Fréchet distance with <= 25 network evaluations vs DDPM-1000 (P5b, <= 5: below "
                        "the sampler table)"),
    ("cfg_batched", "P6: classifier-free guidance in one batched forward vs two forwards"),
    ("compile", "`model.compile: true` (torch.compile of the U-Net, inductor) vs eager: training step (seconds/step)"),
]
GRIDS = ("samples_heldout.png", "samples_train.png", "reconstructions.png")


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def wall_seconds(time_log: Path) -> float:
    """The `real` line of bash's `time` output, in seconds (`real\t35m37.824s`)."""
    for line in time_log.read_text(errors="replace").splitlines():
        if line.startswith("real"):
            minutes, _, rest = line.split()[1].partition("m")
            return 60 * float(minutes) + float(rest.rstrip("s"))
    raise SystemExit(f"error: no `real` line of bash's `time` in {time_log}")


def import_quickstart(run: Path, time_log: Path | None = None, note: str | None = None) -> None:
    """Copy what the README shows of a quickstart run into the repository (numbers and the grids)."""
    report = run / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    keep = {key: metrics[key] for key in ("stage_seconds", "evaluation", "preset") if key in metrics}
    keep["run"] = run.name
    if time_log is not None:
        keep["make_run_seconds"] = wall_seconds(time_log)
    if note:
        keep["note"] = note
    keep["denoiser_vs_step"] = sample_metrics_history(run / "denoiser" / "csv" / "version_0" / "metrics.csv")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quickstart.json").write_text(json.dumps(keep, indent=2) + "\n")
    IMAGES.mkdir(parents=True, exist_ok=True)
    for name in GRIDS:
        if (report / name).is_file():
            shutil.copyfile(report / name, IMAGES / f"quickstart_{name}")
            caption = (report / name).with_suffix(".txt")
            if caption.is_file():
                shutil.copyfile(caption, IMAGES / f"quickstart_{Path(name).stem}.txt")


def sample_metrics_history(csv_path: Path) -> list[dict[str, float]]:
    """The denoiser's `SampleMetrics` values (Fréchet distance, CLIP score) at each step they were measured."""
    import csv

    if not csv_path.is_file():
        return []
    rows: dict[int, dict[str, float]] = {}
    with open(csv_path) as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key.startswith(("val/fd_", "val/fid_", "val/clip_score")) and value:
                    # loggers record a validation after optimiser step n under step n - 1
                    rows.setdefault(int(row["step"]) + 1, {})[key.removeprefix("val/")] = float(value)
    return [{"step": step, **values} for step, values in sorted(rows.items())]


def machine_line(result: dict[str, Any]) -> str:
    machine, threads = result.get("machine", {}), result.get("threads", {})
    return (f"{machine.get('cpu_count', '?')}-core {machine.get('processor', '?')}, torch threads "
            f"{threads.get('torch', '?')}, load {machine.get('load_average_1min', '?')}")


def quickstart_section() -> list[str]:
    data = load("quickstart")
    if data is None:
        return ["No quickstart run has been imported yet: `make quickstart`, then "
                "`python benchmarks/render_readme.py --quickstart runs/quickstart`.", ""]
    seconds = data["stage_seconds"]
    total = sum(seconds.values())
    lines = ["### Quickstart (`make run`: the whole chain on the emoji shards, 2-core CPU)", "",
             "| stage | wall time |", "|---|---|"]
    lines += [f"| {stage} | {value / 60:.1f} min |" for stage, value in seconds.items() if value > 0]
    lines += [f"| all stages | {total / 60:.1f} min |"]
    if "make_run_seconds" in data:
        lines += [f"| **`make run` on a fresh clone** (install, emoji shards, all stages) | "
                  f"**{data['make_run_seconds'] / 60:.1f} min** |"]
    lines.append("")
    if data.get("note"):
        lines += [data["note"], ""]
    for name, title in (("vae_gan", "VAE-GAN reconstructions"), ("denoiser", "Text-to-image samples")):
        evaluation = data.get("evaluation", {}).get(name)
        if evaluation:
            metrics = ", ".join(f"{key} **{value:.4g}**" for key, value in evaluation["metrics"].items())
            lines.append(f"- {title} ({evaluation['num_samples']} held-out-concept images, encoder "
                         f"{evaluation['encoder']}): {metrics}")
    history = data.get("denoiser_vs_step") or []
    if history:
        keys = [key for key in history[-1] if key != "step"]
        lines += ["", "Denoiser sample quality during training (`SampleMetrics`, held-out captions):", "",
                  "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {row['step']} | "
                  + " | ".join(f"{row.get(key, float('nan')):.4g}" for key in keys) + " |" for row in history]
    lines.append("")
    for name, title in (("samples_heldout", "held-out concepts"), ("samples_train", "training concepts")):
        image = IMAGES / f"quickstart_{name}.png"
        if image.is_file():
            lines += [f"Samples, {title}{grid_rows(IMAGES / f'quickstart_{name}.txt')}:", "",
                      f"![{title}](docs/results/{image.name})", ""]
    return lines


def grid_rows(caption: Path) -> str:
    """` — rows: <prompt> at w = 1, 3, 5; ...` from a grid's caption file (`row i: prompt='...' guidance=w`)."""
    import re

    if not caption.is_file():
        return ""
    rows: dict[str, list[str]] = {}
    for match in re.finditer(r"prompt='(.*?)' guidance=(\S+)", caption.read_text()):
        rows.setdefault(match[1], []).append(match[2])
    return " — rows: " + "; ".join(f"“{p}” at w = {', '.join(w)}" for p, w in rows.items()) if rows else ""


def benchmark_section() -> list[str]:
    lines = ["### Benchmarks (`make bench`; ratios measured against a baseline in the same run)", "",
             "| benchmark | ratio | target | verdict | machine | command |", "|---|---|---|---|---|---|"]
    for name, what in BENCHMARKS:
        result = load(name)
        if result is None:
            lines.append(f"| {what} | not run | | | | `python benchmarks/{name}.py` |")
            continue
        verdict = "pass" if result.get("passed") else "**miss**"
        lines.append(f"| {what} | {result['ratio']:.3f} | {result.get('target', '')} | {verdict} | "
                     f"{machine_line(result)} | `{result['command']}` |")
    lines.append("")
    for name, _ in BENCHMARKS:
        result = load(name)
        if result and result.get("ratio_definition"):
            lines.append(f"- {name}: ratio = {result['ratio_definition']}")
        for label, ratio in ((result or {}).get("extra_ratios") or {}).items():
            lines.append(f"  - also measured in the same run: {label} = {ratio:.3f}")
    lines.append("")
    return lines


def sampler_section() -> list[str]:
    result = load("sampler_quality")
    if result is None:
        return []
    lines = [f"### Samplers: Fréchet distance vs network evaluations ({result['num_samples']} samples, encoder "
             f"{result['encoder']}, guidance {result['guidance']})", "",
             "| sampler | steps | evaluations | Fréchet distance | CLIP score | seconds |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        clip = "" if row.get("clip_score") is None else f"{row['clip_score']:.2f}"
        sampler = " ".join([row["sampler"], *(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in (row.get("options") or {}).items())])
        lines.append(f"| {sampler} | {row['steps']} | {row['nfe']} | {row['fd']:.2f} | {clip} | "
                     f"{row['seconds']:.0f} |")
    lines += ["", f"![Fréchet distance vs evaluations]({result['plot']})", ""]
    p5b = result.get("p5b")
    if p5b:
        verdict = "met" if p5b["passed"] else "not met"
        lines += [f"P5b ({p5b['ratio_definition']}): {p5b['best']}, ratio {p5b['ratio']:.3f}, target "
                  f"{p5b['target']} ({verdict}).", ""]
    return lines


def guidance_section() -> list[str]:
    result = load("guidance_sweep")
    if result is None:
        return []
    lines = [f"### Classifier-free guidance ({result['num_samples']} held-out captions, {result['sampler']})", "",
             "| guidance w | Fréchet distance | CLIP score |", "|---|---|---|"]
    for row in result["rows"]:
        clip = "" if row.get("clip_score") is None else f"{row['clip_score']:.2f}"
        lines.append(f"| {row['guidance']:g} | {row['fd']:.2f} | {clip} |")
    weights = ", ".join(format(row["guidance"], "g") for row in result["rows"])
    lines += ["", f"![guidance sweep]({result['plot']})", "",
              f"Rows: {', '.join(result['prompts'])}, each at w = {weights} (same seeds):", "",
              f"![guidance grid]({result['grid']})", ""]
    return lines


def classifier_guidance_section() -> list[str]:
    result = load("classifier_guidance")
    if result is None:
        return []
    buckets = result["accuracy_vs_t"]
    lines = [f"### Classifier guidance (`{result['command']}`)", "",
             f"{result['training']['denoiser']}; noisy classifiers: {result['training']['classifiers']}. "
             f"Labels: {', '.join(result['labels'].values())}. Accuracy on the val split by diffusion step t:", "",
             "| t | " + " | ".join(row["t"] for row in buckets) + " |", "|---" * (len(buckets) + 1) + "|",
             "| guiding classifier | " + " | ".join(f"{row['guide_accuracy']:.3f}" for row in buckets) + " |",
             "| judge classifier | " + " | ".join(f"{row['judge_accuracy']:.3f}" for row in buckets) + " |", "",
             f"Guided samples ({result['sampler']}, {result['samples_per_label']} per label), judged by "
             f"{result['judged_by']}:", "", "| scale s | judge accuracy | guide accuracy |", "|---|---|---|"]
    for row in result["guided"]:
        lines.append(f"| {row['scale']:g} | {row['judge_accuracy']:.3f} | {row['guide_accuracy']:.3f} |")
    grid = result["grid"].split(" ", 1)
    lines += ["", f"![classifier guidance]({grid[0]})", ""]
    if len(grid) > 1:
        lines.insert(-2, f"Grid {grid[1]}:")
        lines.insert(-2, "")
    return lines


def text_conditioning_section() -> list[str]:
    result = load("text_conditioning")
    if result is None:
        return []
    table = result["table"]
    metrics = [key for key in table[0] if key not in ("variant", "text_encoder", "step")]
    lines = [f"### Which text encoder conditions the denoiser (`{result['command']}`)", "",
             f"The quickstart's denoiser with three text encoders, everything else equal; {result['metrics']}.", "",
             "| variant | text encoder | step | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 3) + "|"]
    for row in table:
        lines.append(f"| {row['variant']} | {row['text_encoder']} | {row['step']} | "
                     + " | ".join(f"{row[key]:.2f}" for key in metrics) + " |")
    grid = result["grid"].split(" ", 1)
    lines += ["", f"Lowest Fréchet distance: **{result['best_by_fd']}**."
              + (" Each CLIP judge scores highest the denoiser that reads its own text tower, so the CLIP scores "
                 "compare judges more than encoders; the Fréchet distance has no such bias."
                 if any("judge" in key for key in metrics) else ""), "",
              f"![text conditioning curves]({result['curves']})", "", f"Grid {grid[1]}:", "",
              f"![text conditioning samples]({grid[0]})", ""]
    return lines


def render() -> str:
    lines = [START, "", "*Generated by `python benchmarks/render_readme.py` from `benchmarks/results/*.json`; "
             "do not edit by hand.*", ""]
    lines += (quickstart_section() + benchmark_section() + sampler_section() + guidance_section()
              + classifier_guidance_section() + text_conditioning_section())
    return "\n".join(lines).rstrip() + "\n\n" + END


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", type=Path, help="a finished quickstart run folder to import first")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--time-log", type=Path, help="bash `time make run` output of a fresh clone (its `real` line)")
    parser.add_argument("--note", help="a sentence shown under the quickstart table (what to know about this run)")
    args = parser.parse_args(argv)
    if args.quickstart is not None:
        if not (args.quickstart / "report" / "metrics.json").is_file():
            raise SystemExit(f"error: {args.quickstart}/report/metrics.json is missing: run `make quickstart` first")
        import_quickstart(args.quickstart, args.time_log, args.note)
    text = args.readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"error: {args.readme} has no {START} ... {END} markers: add them where the section goes")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    args.readme.write_text(head + render() + tail)
    print(f"wrote the results section of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
