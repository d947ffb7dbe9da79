"""`compare RUN_DIR... | SWEEP_DIR | --group NAME [--root runs]`: final/best metrics, differing hyper-parameters, plots.

A sweep folder (`sweep --submit` writes one; it holds `tasks.jsonl`) compares all its tasks and writes into
`<sweep folder>/compare/`.

Reads local runs only (offline W&B runs and Lightning CSV logs, see `lightning_diffusion.training.run_logs`), so it works
on a cluster without internet and on runs still in progress. Writes `summary.json`, `table.txt` and PNGs:
one curve plot per metric (all runs), and one plot of each metric's final value against each swept
hyper-parameter.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from lightning_diffusion.errors import UserError
from lightning_diffusion.training.run_logs import RunLog, find_runs

# Differ between runs by construction, so they are never "the swept hyper-parameter".
_BOOKKEEPING = re.compile(
    r"(default_root_dir|save_dir|dirpath|logger\.init_args\.(name|id|group|tags|notes)|ckpt_path|^config$|"
    r"trainer\.logger\.class_path)"
)
_HIGHER_IS_BETTER = re.compile(r"(acc|psnr|ssim|clip_score|recall|precision|auc|top\d)", re.IGNORECASE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (each may hold several runs)")
    parser.add_argument("--group", help="compare every W&B run of this group (sweep) found under --root")
    parser.add_argument("--root", type=Path, default=Path("runs"), help="where to look for --group (default: runs)")
    parser.add_argument("--metrics", help="comma-separated metric keys to report (default: those all runs logged)")
    parser.add_argument("--out", type=Path,
                        help="folder for summary.json, table.txt and PNGs (default: <sweep folder>/compare for one "
                             "sweep folder, else <root>/compare-<group|runs>)")


def higher_is_better(metric: str) -> bool:
    return bool(_HIGHER_IS_BETTER.search(metric))


def summarize(runs: list[RunLog], metrics: list[str]) -> list[dict[str, Any]]:
    """Per run: final value (last step) and best value (min, or max for accuracy-like keys) of each metric."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.name, "id": run.run_id, "kind": run.kind, "path": str(run.path)}
        for metric in metrics:
            values = [value for _, value in run.history.get(metric, [])]
            if values:
                row[f"{metric}/final"] = values[-1]
                row[f"{metric}/best"] = max(values) if higher_is_better(metric) else min(values)
        rows.append(row)
    return rows


def differing_hparams(runs: list[RunLog]) -> dict[str, list[Any]]:
    """Config keys whose values are not the same in every run (bookkeeping keys such as paths left out)."""
    keys = sorted({key for run in runs for key in run.config if not _BOOKKEEPING.search(key)})
    differing = {}
    for key in keys:
        values = [run.config.get(key) for run in runs]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            differing[key] = values
    return {key: values for key, values in differing.items() if not _duplicates_cli_key(key, values, differing)}


def _duplicates_cli_key(key: str, values: list[Any], differing: dict[str, list[Any]]) -> bool:
    """Lightning also logs `model.hparams` at top level (`lr`), next to the CLI's `model.init_args.lr`."""
    return "." not in key and any(differing.get(f"{part}.init_args.{key}") == values for part in ("model", "data"))


def format_table(
    rows: list[dict[str, Any]], hparams: dict[str, list[Any]], metrics: list[str], max_width: int = 160
) -> str:
    """A fixed-width text table: run, differing hyper-parameters, then final/best of each metric (one column
    per run instead when that is too wide)."""
    header = ["run", *hparams, *(f"{m} {s}" for m in metrics for s in ("final", "best"))]
    body = []
    for index, row in enumerate(rows):
        cells = [row["run"], *(_cell(values[index]) for values in hparams.values())]
        cells += [_cell(row.get(f"{m}/{s}")) for m in metrics for s in ("final", "best")]
        body.append(cells)
    table = _aligned([header, *body])
    if max(len(line) for line in table.splitlines()) > max_width:  # many metrics: one row per quantity instead
        table = _aligned([list(column) for column in zip(header, *body)])
    return table


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:  # noqa: ANN401 - any config or metric value
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", text).strip("_")


def plot_curves(runs: list[RunLog], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    for run in runs:
        points = run.history.get(metric, [])
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=run.name)
    axis.set_xlabel("step")
    axis.set_ylabel(metric)
    axis.set_title(metric)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_against(rows: list[dict[str, Any]], metric: str, hparam: str, values: list[Any], path: Path) -> None:
    """Final metric against one hyper-parameter (numeric axis when every value is a number, else categories)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(v, row.get(f"{metric}/final")) for v, row in zip(values, rows) if row.get(f"{metric}/final") is not None]
    figure, axis = plt.subplots(figsize=(5, 4), dpi=100)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in pairs)
    if numeric:
        pairs.sort(key=lambda pair: pair[0])
        axis.plot([v for v, _ in pairs], [m for _, m in pairs], marker="o")
        positive = all(v > 0 for v, _ in pairs)
        if positive and max(v for v, _ in pairs) / min(v for v, _ in pairs) >= 100:
            axis.set_xscale("log")
    else:
        labels = [str(v) for v, _ in pairs]
        axis.bar(range(len(pairs)), [m for _, m in pairs], tick_label=labels)
    axis.set_xlabel(hparam)
    axis.set_ylabel(f"{metric} (final)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _select_runs(args: argparse.Namespace) -> list[RunLog]:
    if args.group:
        if not args.root.is_dir():
            raise UserError(f"--root folder '{args.root}' does not exist: pass the folder that holds the runs")
        runs = [run for run in find_runs(args.root) if run.group == args.group]
        if not runs:
            raise UserError(f"no run of group '{args.group}' under '{args.root}': check the name or --root")
        return runs
    if not args.runs:
        raise UserError("give run folders or --group NAME (see `python -m lightning_diffusion compare --help`)")
    runs = []
    for folder in args.runs:
        if not folder.is_dir():
            raise UserError(f"run folder '{folder}' does not exist")
        found = find_runs(folder)
        if not found:
            raise UserError(f"no W&B run or metrics.csv found under '{folder}': is it a run's root dir?")
        runs += found
    return runs


def default_out(args: argparse.Namespace) -> Path:
    """`<sweep>/compare` for one sweep folder, else `compare-<group|runs>` next to the runs."""
    if not args.group and len(args.runs) == 1 and (args.runs[0] / "tasks.jsonl").is_file():
        return args.runs[0] / "compare"
    return (args.root if args.group else Path(args.runs[0]).parent) / f"compare-{args.group or 'runs'}"


def run(args: argparse.Namespace) -> int:
    runs = _select_runs(args)
    logged = [set(run.history) for run in runs]
    if args.metrics:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    else:
        metrics = sorted(set.intersection(*logged)) if logged else []
    hparams = differing_hparams(runs)
    rows = summarize(runs, metrics)
    table = format_table(rows, hparams, metrics)
    print(table)
    for run_log in runs:
        if not run_log.finished:
            print(f"note: {run_log.name} ({run_log.path}) has no exit record: still running, or it crashed")

    out = args.out or default_out(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(table + "\n")
    summary = {"runs": rows, "hparams": hparams, "metrics": metrics}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plots = []
    swept = {key: values for key, values in hparams.items() if sum(value is not None for value in values) >= 2}
    for metric in metrics:
        path = out / f"curves_{_file_name(metric)}.png"
        plot_curves(runs, metric, path)
        plots.append(path)
        for hparam, values in swept.items():  # set in at least two runs: something to plot against
            path = out / f"{_file_name(metric)}_vs_{_file_name(hparam)}.png"
            plot_against(rows, metric, hparam, values, path)
            plots.append(path)
    print(f"wrote {out / 'table.txt'}, {out / 'summary.json'} and {len(plots)} plots under {out}")
    return 0
