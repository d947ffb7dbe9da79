"""Run every benchmark, one process each, and print a table of their ratios against the targets.

    python benchmarks/run_all.py            # the measurements: results/<name>.json (several minutes each on CPU)
    python benchmarks/run_all.py --quick    # tiny sizes, a smoke check: results/quick/<name>.json
    make bench

Full runs read the emoji shards (data/emoji) when they exist, and the quickstart's checkpoints (--quickstart,
default runs/quickstart) when they exist: P4 then times the quickstart's VAE-GAN and CLIP text tower (and, in full
runs, once more at the GPU presets' sizes: `latents_vs_on_the_fly_ldm`) and P6
samples from its denoiser. Without them each benchmark falls back to synthetic data and self-made models (its
JSON says which). A benchmark that crashes is reported and the others still run; the exit status is 1 then.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EMOJI_TRAIN = ROOT / "data/emoji/train-000000.tar"


def existing(path: Path) -> str | None:
    return str(path) if path.is_file() else None


def plan(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(result name, script, its extra arguments), in the order they run."""
    emoji = str(EMOJI_TRAIN.parent / "train-*.tar") if EMOJI_TRAIN.is_file() and not args.quick else None
    qs = Path(args.quickstart)
    vae = None if args.quick else existing(qs / "vae_gan/checkpoints/last.ckpt")
    clip = None if args.quick else existing(qs / "clip/checkpoints/last.ckpt")
    denoiser = None if args.quick else existing(qs / "denoiser/checkpoints/last.ckpt")

    def optional(flag: str, value: str | None) -> list[str]:
        return [flag, value] if value else []

    runs = [
        ("lightning_overhead", []),
        ("unet_vs_diffusers", []),
        ("data_throughput", optional("--shards", emoji)),
        ("latents_vs_on_the_fly", optional("--shards", emoji) + optional("--vae", vae) + optional("--clip", clip)),
        ("cfg_batched", optional("--ckpt", denoiser)),
        ("compile", []),
    ]
    planned = [(name, name, extra) for name, extra in runs]
    if not args.quick:  # P4 at the GPU presets' sizes (random-weight kl-f8 VAE-GAN, ViT-B-32 text, ldm_base U-Net)
        planned.insert(4, ("latents_vs_on_the_fly_ldm", "latents_vs_on_the_fly", ["--preset", "ldm"]))
    return planned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke check")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every benchmark (default 1)")
    parser.add_argument("--quickstart", default=str(ROOT / "runs/quickstart"),
                        help="a quickstart run folder whose checkpoints P4 and P6 use when present")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names to run")
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    results_dir = HERE / "results" / ("quick" if args.quick else "")
    chosen = set(args.only.split(",")) if args.only else None
    rows, failed = [], []
    for name, script, extra in plan(args):
        if chosen is not None and name not in chosen:
            continue
        command = [sys.executable, str(HERE / f"{script}.py"), "--threads", str(args.threads), *extra]
        command += ["--quick"] if args.quick else []
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        status = subprocess.run(command, cwd=ROOT, env=env).returncode
        elapsed = time.perf_counter() - start
        if status != 0:
            failed.append(name)
            rows.append((name, "crashed", f"exit {status}", "", elapsed))
            continue
        result = json.loads((results_dir / f"{name}.json").read_text())
        rows.append((name, f"{result['ratio']:.3f}", result["target"], "pass" if result["passed"] else "FAIL", elapsed))
    print(f"\n{'benchmark':<26} {'ratio':>8}  {'target':<8} {'':<5} {'seconds':>8}")
    for name, ratio, target, verdict, elapsed in rows:
        print(f"{name:<26} {ratio:>8}  {target:<8} {verdict:<5} {elapsed:>8.1f}")
    print(f"results in {results_dir.relative_to(ROOT)}/")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
