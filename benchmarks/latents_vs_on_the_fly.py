"""P4: denoiser training on pre-encoded latent shards vs encoding the images with the frozen VAE-GAN on the fly.

Target: on-the-fly seconds/step / pre-encoded seconds/step >= 3. Both arms fit the same latent text-to-image
denoiser (same seed) with `Trainer.fit` through `ShardDataModule`, the same batch size, workers and steps:

- on the fly: the image shards (PNG decode + resize in the workers), `Denoiser.batch_x0` encoding every batch with
  the VAE-GAN, the CLIP text tower encoding every caption;
- pre-encoded: the shards `python -m lightning_diffusion encode-latents --text-encoder` wrote from the same images
  with the same models (`tensor_keys: [latent.npy, text_emb.npy, text_pooled.npy]`, as the quickstart's denoiser
  stage reads them). The one-off encoding time is reported too.

What the ratio can be depends on how the encoders' cost compares with the denoiser's step, so two presets:

- `--preset quickstart` (default): the quickstart's models (`configs/pipeline/quickstart.yaml`): a 32 px tiny
  VAE-GAN (--vae, or one of `configs/vae_gan/tiny.yaml`'s architecture trained --vae-steps steps), the tiny CLIP
  (--clip; without it the denoiser is unconditional) and the tiny U-Net;
- `--preset ldm`: the GPU presets' architectures at 256 px: the kl-f8 VAE-GAN of `configs/vae_gan/kl_f8.yaml`,
  the ViT-B-32 text tower of `configs/clip/vit_b32.yaml` and the 32x32x4 U-Net of `configs/denoiser/ldm_base.yaml`,
  randomly initialised (timing depends on the architecture, not the weights). Writes
  `results/latents_vs_on_the_fly_ldm.json`.

Seconds/step leave out the first --warmup steps (worker start-up), median of --repeats alternating runs.

    python benchmarks/latents_vs_on_the_fly.py --shards 'data/emoji/train-*.tar' \
        --vae runs/quickstart/vae_gan/checkpoints/last.ckpt --clip runs/quickstart/clip/checkpoints/last.ckpt
    python benchmarks/latents_vs_on_the_fly.py --preset ldm --shards 'data/emoji_256/train-*.tar'
    python benchmarks/latents_vs_on_the_fly.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from common import (
    ROOT, StepClock, add_common_arguments, alternate, clock_callback, finish_arguments, median, resolve_device,
    seconds, synthetic_shards, write_result,
)

from lightning_diffusion.diffusion.module import Denoiser

QUICK_DENOISER = dict(base_channels=16, num_res_blocks=1)


def quickstart_denoiser() -> tuple[dict[str, Any], int, int]:
    """(the quickstart denoiser's init_args, its batch size, the preset's image size) from the config files."""
    preset = yaml.safe_load((ROOT / "configs/pipeline/quickstart.yaml").read_text())
    stage = preset["stages"]["denoiser"]
    config = yaml.safe_load((ROOT / stage["config"]).read_text())
    init_args = dict(config["model"]["init_args"])
    batch_size = config["data"]["init_args"]["batch_size"]
    for key, value in (stage.get("overrides") or {}).items():
        if key.startswith("model.init_args."):
            init_args[key.removeprefix("model.init_args.")] = value
        elif key == "data.init_args.batch_size":
            batch_size = value
    return init_args, batch_size, preset["image_size"]


def ldm_denoiser() -> tuple[dict[str, Any], int, int]:
    """(`configs/denoiser/ldm_base.yaml`'s init_args, a CPU-sized batch of 4, its image size)."""
    init_args = dict(yaml.safe_load((ROOT / "configs/denoiser/ldm_base.yaml").read_text())["model"]["init_args"])
    return init_args, 4, init_args["image_size"]


def untrained_checkpoint(config: str, path: Path, **overrides: Any) -> None:
    """A randomly initialised model of a config's architecture, saved like a fit's checkpoint (weights only)."""
    from lightning_diffusion.autoencoder import VAEGAN
    from lightning_diffusion.clip import CLIPModule

    init_args = {**yaml.safe_load((ROOT / config).read_text())["model"]["init_args"], **overrides}
    torch.manual_seed(0)
    model = VAEGAN(**init_args) if "vae_gan" in config else CLIPModule(**init_args)
    if isinstance(model, VAEGAN):
        model.latent_window[0] = torch.tensor([0.0, 4.0, 4.0], dtype=torch.float64)  # latent_scale 1, "measured"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)


def tiny_vae(path: Path, image_size: int, steps: int, device: torch.device) -> None:
    """A VAE-GAN of `configs/vae_gan/tiny.yaml`'s architecture, trained `steps` steps on noise, saved to `path`."""
    import lightning.pytorch as pl

    from lightning_diffusion.autoencoder import VAEGAN

    init_args = yaml.safe_load((ROOT / "configs/vae_gan/tiny.yaml").read_text())["model"]["init_args"]
    init_args.update(image_size=image_size, perceptual="none", val_frechet=False)
    torch.manual_seed(0)
    model = VAEGAN(**init_args)
    images = [{"image": torch.rand(8, 3, image_size, image_size) * 2 - 1} for _ in range(steps)]
    trainer = pl.Trainer(max_steps=steps, accelerator=device.type, devices=1, precision="32-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=path.parent)
    trainer.fit(model, torch.utils.data.DataLoader(images, batch_size=None))
    trainer.save_checkpoint(path)


def encode_latents(vae: str, clip: str | None, shards: str, out: Path, image_size: int, workers: int,
                   device: torch.device, threads: int) -> float:
    """Run the documented command (with the benchmark's torch threads); returns its wall-clock seconds."""
    command = [sys.executable, "-m", "lightning_diffusion", "encode-latents", "--vae", vae, "--in", shards,
               "--out", str(out), "--image-size", str(image_size), "--num-workers", str(workers),
               "--device", str(device), "--batch-size", "8"]
    command += ["--text-encoder", clip] if clip else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    return time.perf_counter() - start


def fit_seconds_per_step(model: Denoiser, data: Any, args: argparse.Namespace, device: torch.device) -> float:
    import lightning.pytorch as pl

    clock = StepClock(device)
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(max_steps=args.warmup + args.steps, accelerator=device.type, devices=1,
                             precision="32-true", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0, callbacks=[clock_callback(clock)], default_root_dir=root)
        trainer.fit(model, datamodule=data)
    return clock.seconds_per_step(args.warmup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("quickstart", "ldm"), default="quickstart",
                        help="the models timed: the quickstart's tiny ones (default) or the GPU presets' (see above)")
    parser.add_argument("--shards", default=None,
                        help="image shards (default: synthetic PNG shards at the preset's image size)")
    parser.add_argument("--vae", default=None, help="VAE-GAN checkpoint (default: a tiny one trained briefly)")
    parser.add_argument("--vae-steps", type=int, default=5, help="training steps of the default VAE-GAN")
    parser.add_argument("--clip", default=None, help="CLIP checkpoint for text conditioning (default: none)")
    parser.add_argument("--samples", type=int, default=None,
                        help="synthetic images without --shards (default 2000, quick 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the quickstart's (quick 4)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading workers of both arms (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 40, quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 5, quick 2)")
    add_common_arguments(parser, repeats=3)
    args = finish_arguments(parser.parse_args(argv))
    ldm = args.preset == "ldm"
    args.steps = args.steps or (3 if args.quick else 5 if ldm else 40)
    args.warmup = args.warmup or (2 if args.quick or ldm else 5)
    device = resolve_device(args.device)
    if ldm and (args.quick or args.vae or args.clip):
        parser.error("--preset ldm builds its own models: leave out --quick, --vae and --clip")
    init_args, batch_size, image_size = ldm_denoiser() if ldm else quickstart_denoiser()
    batch_size = args.batch_size or (4 if args.quick else batch_size)

    from data_pipelines import ShardDataModule
    from data_pipelines.urls import resolve_shards

    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        samples = args.samples or (64 if args.quick else batch_size * (args.warmup + args.steps + 1) if ldm else 2000)
        shards = args.shards or synthetic_shards(scratch_dir, samples, size=max(64, image_size))
        vae, clip = args.vae, args.clip
        if ldm:
            vae, clip = str(scratch_dir / "vae.ckpt"), str(scratch_dir / "clip.ckpt")
            untrained_checkpoint("configs/vae_gan/kl_f8.yaml", Path(vae), perceptual="none", val_frechet=False)
            untrained_checkpoint("configs/clip/vit_b32.yaml", Path(clip))
        elif vae is None:
            vae = str(scratch_dir / "vae.ckpt")
            tiny_vae(Path(vae), image_size, args.vae_steps, device)
        encode_s = encode_latents(vae, clip, shards, scratch_dir / "latents", image_size, args.workers, device,
                                  args.threads)
        latent_shards = str(scratch_dir / "latents" / "train-*.tar")
        manifest = json.loads((scratch_dir / "latents" / "manifest.json").read_text())
        num_samples = sum(shard["count"] for shard in manifest["shards"])

        init_args.update(image_size=image_size, space="latent", vae_checkpoint=vae, seed=0,
                         **(QUICK_DENOISER if args.quick else {}))
        if clip:
            init_args.update(conditioning="text", text_encoder="clip", clip_checkpoint=clip)
        else:
            init_args.update(conditioning="none", val_guidance=1.0)
        torch.manual_seed(0)
        model = Denoiser(**init_args)
        initial = copy.deepcopy(model.state_dict())
        common = dict(image_size=image_size, batch_size=batch_size, num_workers=args.workers, seed=0,
                      random_flip=False, persistent_workers=False)
        arms = {"on_the_fly": dict(train_urls=resolve_shards(shards, "--shards")),
                "pre_encoded": dict(train_urls=latent_shards, image_keys=[],
                                    tensor_keys=["latent.npy"] + (["text_emb.npy", "text_pooled.npy"] if clip else []))}

        def run(arm: str) -> Any:
            def timed() -> float:
                model.load_state_dict(initial)
                torch.manual_seed(0)
                return fit_seconds_per_step(model, ShardDataModule(**common, **arms[arm]), args, device)
            return timed

        runs = alternate({arm: run(arm) for arm in arms}, args.repeats)
        text_s = None
        if clip:
            tokens = model.tokenizer(["a 3D rendered emoji of koala"] * batch_size)
            text_s = median([seconds(lambda: model.text_condition(tokens), device) for _ in range(3)])
        images = torch.rand(batch_size, 3, image_size, image_size, device=device) * 2 - 1
        vae_s = median([seconds(lambda: model.encode_images(images), device) for _ in range(3)])

    fly_s, pre_s = median(runs["on_the_fly"]), median(runs["pre_encoded"])
    result = {
        "preset": args.preset, "device": str(device), "samples": num_samples,
        "shards": args.shards or f"synthetic: {num_samples} {max(64, image_size)} px PNG",
        "vae": ("configs/vae_gan/kl_f8.yaml architecture, random weights" if ldm else args.vae
                or f"tiny VAE-GAN (configs/vae_gan/tiny.yaml architecture, {args.vae_steps} steps)"),
        "conditioning": ("text (configs/clip/vit_b32.yaml text tower, random weights)" if ldm
                         else "text (CLIP " + args.clip + ")" if args.clip else "none"),
        "denoiser": "configs/denoiser/ldm_base.yaml" if ldm else "quickstart (configs/pipeline/quickstart.yaml)",
        "image_size": image_size, "latent_shape": list(model.sample_shape), "batch_size": batch_size,
        "workers": args.workers, "steps_timed": args.steps, "warmup_steps": args.warmup,
        "denoiser_parameters": sum(p.numel() for p in model.parameters()),
        "encode_latents_s": round(encode_s, 2),
        "on_the_fly_s_per_step": round(fly_s, 5), "pre_encoded_s_per_step": round(pre_s, 5),
        "epoch_estimate_s": {"on_the_fly": round(fly_s * num_samples / batch_size, 1),
                             "pre_encoded": round(pre_s * num_samples / batch_size, 1)},
        "text_encoder_s_per_batch": None if text_s is None else round(text_s, 5),
        "vae_encode_s_per_batch": round(vae_s, 5),
        "all_runs_s_per_step": {name: [round(v, 5) for v in values] for name, values in runs.items()},
    }
    write_result("latents_vs_on_the_fly" + ("_ldm" if ldm else ""), args, result, ratio=fly_s / pre_s, target=">= 3",
                 ratio_definition="on-the-fly s/step / pre-encoded s/step (denoiser Trainer.fit)", device=device,
                 packages=("webdataset", "open_clip_torch"),
                 summary=("on_the_fly_s_per_step", "pre_encoded_s_per_step", "encode_latents_s"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
