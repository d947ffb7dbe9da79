"""`python -m lightning_diffusion export --ckpt C --format diffusers --out DIR`: a checkpoint in another library's
format, so what was trained here loads there: a VAE-GAN in diffusers (`AutoencoderKL.from_pretrained(DIR)`), a CLIP
in open_clip (`--format open_clip`: `open_clip.create_model('local-dir:DIR')`), a denoiser as a plain folder
(`--format folder`: `sample --ckpt DIR`). Weights are safetensors.

The checkpoint's model kind (read from its hyper-parameters, see `KINDS`) and `--format` choose the exporter in
`EXPORTERS`; each is a `module:function` taking `(ckpt: Path, out: Path)`, writing the folder and returning a
summary line. The folder is written next to `--out` under a temporary name and renamed when complete, so an
error leaves nothing half-written. To add an export: one entry in `KINDS` (if the kind is new) and one in
`EXPORTERS`.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_diffusion.errors import UserError

# model kind -> test on the checkpoint's hyper-parameters (a key only that model's constructor has)
KINDS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "vae_gan": lambda hparams: "disc_start" in hparams,
    "denoiser": lambda hparams: "objective" in hparams,
    "clip": lambda hparams: "model_name" in hparams and "loss" in hparams,
}
# (model kind, --format) -> "module:function" with function(ckpt: Path, out: Path) -> summary line
EXPORTERS: dict[tuple[str, str], str] = {
    ("vae_gan", "diffusers"): "lightning_diffusion.autoencoder.diffusers_export:export_vae_gan",
    ("clip", "open_clip"): "lightning_diffusion.clip.export_open_clip:export_open_clip",
    ("denoiser", "folder"): "lightning_diffusion.diffusion.export:export_denoiser",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, type=Path, help="Lightning checkpoint to export")
    parser.add_argument("--format", required=True,
                        help="target format, by model kind: " + "; ".join(f"{k} -> {f}" for k, f in EXPORTERS))
    parser.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")


def model_kind(ckpt: Path) -> str:
    """The kind of model a checkpoint holds (a key of `KINDS`), loaded weights-only."""
    from lightning_diffusion.training.checkpoints import load_checkpoint

    mmap = ckpt.is_file() and zipfile.is_zipfile(ckpt)  # only the hyper-parameters are read here
    checkpoint = load_checkpoint(ckpt, what="checkpoint", key="--ckpt", mmap=mmap)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    kind = next((name for name, test in KINDS.items() if isinstance(hparams, dict) and test(hparams)), None)
    if kind is None or "state_dict" not in checkpoint:
        raise UserError(f"'{ckpt}' (--ckpt) is not a checkpoint of a model this command exports "
                        f"({', '.join(sorted({k for k, _ in EXPORTERS}))}): pass one written by fit")
    return kind


def exporter(kind: str, fmt: str) -> Callable[[Path, Path], str]:
    if (kind, fmt) not in EXPORTERS:
        choices = [f for k, f in EXPORTERS if k == kind]
        if fmt not in {f for _, f in EXPORTERS}:
            raise UserError(f"unknown --format {fmt!r}: use one of {', '.join(sorted({f for _, f in EXPORTERS}))}")
        raise UserError(f"a {kind} checkpoint cannot be exported to --format {fmt}: "
                        + (f"use --format {' or '.join(choices)}" if choices else "no export exists for it yet"))
    module, _, function = EXPORTERS[(kind, fmt)].partition(":")
    return getattr(importlib.import_module(module), function)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder: choose a new folder (nothing was written)")
    export = exporter(model_kind(args.ckpt), args.format)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        summary = export(args.ckpt, partial)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {out} ({args.format}): {summary}")
    return 0
