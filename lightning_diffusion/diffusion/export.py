"""`export --format folder`: a denoiser checkpoint -> a plain folder that `sample --ckpt DIR` (and
`load_denoiser`) reads like the Lightning checkpoint, with the same images for the same seed.

The folder holds `denoiser.safetensors` (the checkpoint's `state_dict`: the U-Net weights, EMA-averaged when the
model trained with EMA, and the learned null condition of classifier-free guidance) and `denoiser.json`: the
constructor arguments (`hyper_parameters`: objective, schedule, number of timesteps, sampler, steps and guidance
of validation, U-Net sizes), with the paths of the frozen VAE (`vae_checkpoint`) and text encoder
(`text_encoder`, `clip_checkpoint` / `text_encoder_path`, `text_encoder_arch`, `text_layer`) as the run named
them. Those files are not copied: keep them at those paths, or override them (`sample --vae-checkpoint`, ...).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from lightning_diffusion.errors import UserError

CONFIG_NAME, WEIGHTS_NAME, FORMAT = "denoiser.json", "denoiser.safetensors", "lightning_diffusion.denoiser/1"
LAYOUT = f"a folder written by `export --format folder` ({CONFIG_NAME} + {WEIGHTS_NAME})"


def export_denoiser(ckpt: Path, out: Path) -> str:
    """Write the export folder of denoiser checkpoint `ckpt` into `out`; returns a summary line."""
    from safetensors.torch import save_file

    from lightning_diffusion.training.checkpoints import check_checkpoint_class, load_checkpoint

    checkpoint = load_checkpoint(ckpt, what="denoiser checkpoint", key="--ckpt")
    check_checkpoint_class(checkpoint, "denoiser", path=ckpt, key="--ckpt")
    hparams = checkpoint.get("hyper_parameters") or {}
    if "objective" not in hparams or "state_dict" not in checkpoint:
        raise UserError(f"'{ckpt}' (--ckpt) is not a denoiser checkpoint: pass one written by `fit` with a "
                        "configs/denoiser config")
    kwargs = {key: value for key, value in hparams.items() if not key.startswith("_")}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in checkpoint["state_dict"].items()}, str(out / WEIGHTS_NAME))
    config = {"format": FORMAT, "source": str(ckpt), "hyper_parameters": kwargs}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    frozen = ", ".join(f"{key} {kwargs[key]}" for key in ("vae_checkpoint", "clip_checkpoint", "text_encoder_path")
                       if kwargs.get(key))
    return (f"{len(checkpoint['state_dict'])} tensors in {WEIGHTS_NAME}, arguments in {CONFIG_NAME} "
            f"(frozen parts by path: {frozen or 'none'}); sample with --ckpt <--out>")


def read_export(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constructor arguments, state dict) of an export folder; a `UserError` naming what is missing or wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lightning_diffusion.diffusion.module import Denoiser

    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise UserError(f"'{folder}' (--ckpt) lacks {name}: expected {LAYOUT}, or a Lightning .ckpt file")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"'{folder / CONFIG_NAME}' is not readable JSON ({err}): expected {LAYOUT}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(
            config.get("hyper_parameters"), dict):
        raise UserError(f"'{folder / CONFIG_NAME}' is not a denoiser export (format {FORMAT!r} with "
                        "hyper_parameters): expected " + LAYOUT)
    known = set(inspect.signature(Denoiser.__init__).parameters) - {"self"}
    unknown = sorted(set(config["hyper_parameters"]) - known)
    if unknown:
        raise UserError(f"'{folder / CONFIG_NAME}' has arguments this Denoiser does not take ({', '.join(unknown)}): "
                        "export it again with this version")
    try:
        state = load_file(str(folder / WEIGHTS_NAME))
    except (SafetensorError, OSError) as err:
        raise UserError(f"'{folder / WEIGHTS_NAME}' could not be read ({err}): export the checkpoint again") from err
    return config["hyper_parameters"], state
