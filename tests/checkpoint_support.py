"""Tiny inputs for tests that need real files: image shards, VAE-GAN / CLIP / denoiser checkpoints, fit configs.

Checkpoints are saved the way `load_checkpoint` reads them (`hyper_parameters` + `state_dict`, plain tensors), with
random weights: the tests that use them check validation and loading, not quality.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

SIZE = 16
CAPTIONS = ["a flat vector emoji of koala", "a 3D rendered emoji of red apple", "a flat vector emoji of cat"]

# f = 2 (one halving), no attention, no perceptual network, no Fréchet features: builds in milliseconds.
TINY_VAE = dict(image_size=SIZE, channels=8, channel_mults=[1, 2], num_blocks=1, latent_channels=4,
                mid_attention=False, disc_channels=8, disc_layers=1, val_frechet=False, perceptual="none",
                image_every_n_steps=0)
TINY_CLIP = dict(model_name="ld-tiny-rn", warmup_steps=1)
TINY_DENOISER = dict(image_size=SIZE, conditioning="none", base_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                     attention_resolutions=[], num_heads=2, val_steps=2, samples_per_prompt=1, grid_every_n_steps=1,
                     val_timesteps=2, ema_decay=None)
MODEL_CLASSES = {
    "vae": "lightning_diffusion.autoencoder.VAEGAN",
    "clip": "lightning_diffusion.clip.CLIPModule",
    "denoiser": "lightning_diffusion.diffusion.module.Denoiser",
}
MODEL_ARGS = {"vae": TINY_VAE, "clip": TINY_CLIP, "denoiser": TINY_DENOISER}


def write_image_shards(folder: Path, count: int = 8, prefix: str = "train") -> str:
    """`count` smooth 16 px PNG samples with captions and labels in shards of 4; returns the glob pattern."""
    from data_pipelines.shard_writer import ShardWriter, write_manifest

    generator = torch.Generator().manual_seed(0)
    pixels = torch.nn.functional.interpolate(torch.rand(count, 3, 4, 4, generator=generator), size=(SIZE, SIZE),
                                             mode="bilinear")
    with ShardWriter(folder, prefix, max_samples=4) as writer:
        for i in range(count):
            buffer = io.BytesIO()
            Image.fromarray((pixels[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, "PNG")
            writer.write(f"s{i:03d}", {"png": buffer.getvalue(), "txt": CAPTIONS[i % 3].encode(),
                                       "json": json.dumps({"label": i % 3}).encode()})
    write_manifest(folder, {"dataset": "toy", "shards": writer.shards})
    return str(folder / f"{prefix}-*.tar")


def save_module(model: torch.nn.Module, path: Path) -> Path:
    """`hyper_parameters` and `state_dict`, as a Lightning checkpoint holds them (and `evaluate` finds the class)."""
    hparams = {**dict(model.hparams), "_class_path": f"{type(model).__module__}.{type(model).__name__}"}
    torch.save({"hyper_parameters": hparams, "state_dict": model.state_dict()}, path)
    return path


def vae_checkpoint(path: Path, **overrides: Any) -> Path:
    """A random-weight VAE-GAN (f = 2) with a measured latent_scale."""
    from lightning_diffusion.autoencoder import VAEGAN

    torch.manual_seed(0)
    vae = VAEGAN(**{**TINY_VAE, **overrides})
    vae.latent_scale.fill_(0.7)
    vae.latent_window[0] = torch.tensor([0.0, 4.0, 4.0], dtype=torch.float64)
    return save_module(vae, path)


def clip_checkpoint(path: Path) -> Path:
    from lightning_diffusion.clip import CLIPModule

    torch.manual_seed(0)
    return save_module(CLIPModule(**TINY_CLIP), path)


def denoiser_checkpoint(path: Path, **overrides: Any) -> Path:
    from lightning_diffusion.diffusion.module import Denoiser

    torch.manual_seed(0)
    return save_module(Denoiser(**{**TINY_DENOISER, **overrides}), path)


def fit_config(path: Path, stage: str, root: Path, shards: str, *, model: dict | None = None,
               data: dict | None = None, trainer: dict | None = None) -> Path:
    """A `fit` config for `stage` (vae, clip, denoiser) on `shards`: one CPU step, a CSV logger under `root`."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 1, "accelerator": "cpu", "devices": 1, "precision": "32-true", "default_root_dir": str(root),
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
            **(trainer or {}),
        },
        "model": {"class_path": MODEL_CLASSES[stage], "init_args": {**MODEL_ARGS[stage], **(model or {})}},
        "data": {"class_path": "data_pipelines.ShardDataModule",
                 "init_args": {"train_urls": shards, "image_size": SIZE, "batch_size": 4, "num_workers": 0,
                               "shuffle_buffer": 0, **(data or {})}},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
