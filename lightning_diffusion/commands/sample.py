"""`python -m lightning_diffusion sample`: prompts (or labels, or a low-res image) to a PNG grid and single PNGs.

Several prompts and guidance values in one call make a comparison grid: one row per (prompt, guidance) pair,
``--n`` samples per row, every row starting from the same seed so rows differ only by their condition. The row
labels go to a caption file next to the grid (``grid.txt``); the single images to a folder next to it
(``grid/row00_000.png``). The checkpoint's ``state_dict`` holds the EMA weights when the model trained with EMA.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_diffusion.classifier.guidance import check_pair, guidance_wrapper
from lightning_diffusion.classifier.module import NoisyClassifier
from lightning_diffusion.training.checkpoints import check_checkpoint_class, load_checkpoint
from lightning_diffusion.diffusion.conditioning import downsample_for_lowres
from lightning_diffusion.diffusion.grids import image_grid, save_png, to_uint8
from lightning_diffusion.diffusion.arguments import check_sampling
from lightning_diffusion.diffusion.module import Denoiser
from lightning_diffusion.arguments import (
    atomic_output, check_output_file, device_name, finite_float, nonnegative_int, positive_int,
)
from lightning_diffusion.diffusion.sampling import add_sampling_arguments, check_overrides, sampling_overrides
from lightning_diffusion.errors import UserError

SINGLE_IMAGE = re.compile(r"row\d{2,}_\d{3,}\.png")  # the names of the single images this command writes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="denoiser checkpoint (Lightning .ckpt) or export folder")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text prompt; repeat for several rows (text-conditioned models)")
    parser.add_argument("--label", type=nonnegative_int, action="append", default=None,
                        help="class label; repeat for several rows (class-conditioned models, or --classifier)")
    parser.add_argument("--lowres", default=None, help="low-resolution image to upscale (super-resolution models)")
    parser.add_argument("--guidance", type=finite_float, nargs="+", default=None,
                        help="classifier-free guidance weight(s) w: uncond + w (cond - uncond); 1 = no guidance "
                             "(default: the model's validation guidance)")
    parser.add_argument("--classifier", default=None,
                        help="noisy-image classifier checkpoint (configs/classifier/) steering samples to --label")
    parser.add_argument("--classifier-scale", type=finite_float, default=1.0,
                        help="classifier guidance scale s: eps - s sqrt(1 - abar_t) grad log p(label | x_t) (default 1)")
    add_sampling_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same images")
    parser.add_argument("--n", type=positive_int, default=16, help="samples per row")
    parser.add_argument("--out", default="samples/grid.png", help="grid PNG; single images go to a folder beside it")
    parser.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--vae-checkpoint", default=None,
                        help="override the VAE path stored in the checkpoint (VAE-GAN .ckpt or AutoencoderKL folder)")
    parser.add_argument("--clip-checkpoint", default=None, help="override the CLIP path stored in the checkpoint")
    parser.add_argument("--text-encoder-path", default=None,
                        help="override the pretrained text encoder's file/folder stored in the checkpoint")


def load_denoiser(path: str | Path, **overrides: object) -> Denoiser:
    """A Denoiser from a Lightning checkpoint (weights_only) or an `export --format folder` folder, in eval mode
    on the CPU."""
    if Path(path).is_dir():
        from lightning_diffusion.diffusion.export import read_export

        hparams, state_dict = read_export(path)
        checkpoint = {"state_dict": state_dict}
    else:
        checkpoint = load_checkpoint(path, what="denoiser checkpoint", key="--ckpt")
        check_checkpoint_class(checkpoint, "denoiser", path=path, key="--ckpt")
        hparams = checkpoint.get("hyper_parameters") or {}
    if "objective" not in hparams or "state_dict" not in checkpoint:
        raise UserError(f"'{path}' (--ckpt) is not a denoiser checkpoint: pass one written by "
                        f"`python -m lightning_diffusion fit --config configs/denoiser/...`")
    kwargs = {key: value for key, value in hparams.items() if not key.startswith("_")} | {"compile": False}
    kwargs.update({key: value for key, value in overrides.items() if value is not None})
    model = Denoiser(**kwargs)
    trained = checkpoint["state_dict"].get("unet.out.2.weight")  # [sample channels, C, 3, 3]
    if trained is not None and trained.shape[0] != model.sample_shape[0]:
        raise UserError(f"the VAE '{kwargs.get('vae_checkpoint')}' gives {model.sample_shape[0]} latent channels "
                        f"but the denoiser '{path}' was trained on {trained.shape[0]}: pass the VAE it was trained "
                        "with (--vae-checkpoint)")
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise UserError(f"'{path}' (--ckpt) does not fit the denoiser its hyper-parameters describe "
                        f"({str(err).splitlines()[-1].strip()}): pass a checkpoint written by `fit`") from err
    return model.eval()


def _load_lowres(path: str, size: int) -> torch.Tensor:
    if not Path(path).is_file():
        raise UserError(f"--lowres image '{path}' does not exist")
    try:
        image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    except OSError as err:
        raise UserError(f"--lowres image '{path}' could not be read ({err})") from err
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None] / 127.5 - 1
    return downsample_for_lowres(tensor, size)


def _rows(args: argparse.Namespace, model: Denoiser) -> list[dict]:
    """One dict per grid row: the condition (prompt / label) and the guidance weight."""
    kinds = model.kinds
    if args.prompt is not None and "text" not in kinds:
        raise UserError(f"--prompt given, but this model's conditioning is {model.hparams.conditioning!r}: "
                        "leave out --prompt")
    if args.classifier is not None and not args.label:
        raise UserError("--classifier steers samples towards a class: give at least one --label")
    if args.label is not None and "class" not in kinds and args.classifier is None:
        raise UserError(f"--label given, but this model's conditioning is {model.hparams.conditioning!r}: "
                        "leave out --label")
    if "text" in kinds and not args.prompt:
        raise UserError("this model is text-conditioned: give at least one --prompt")
    if "class" in kinds and not args.label:
        raise UserError("this model is class-conditioned: give at least one --label")
    if args.lowres is not None and "lowres" not in kinds:
        raise UserError(f"--lowres given, but this model takes no low-resolution input (conditioning "
                        f"{model.hparams.conditioning!r}): leave out --lowres")
    if "lowres" in kinds and not args.lowres:
        raise UserError("this model is a super-resolution stage: give --lowres IMAGE")
    if any(not prompt.strip() for prompt in args.prompt or []):
        raise UserError("--prompt is empty: give the text to draw, e.g. --prompt 'a 3D rendered emoji of koala'")
    prompts = [{"prompt": p} for p in args.prompt or []] or [{}]
    labels = [{"label": k} for k in args.label or []] or [{}]
    conditions = [{**p, **k} for p in prompts for k in labels]  # a text model steered by a classifier: both
    return [{**condition, "guidance": g} for condition in conditions
            for g in (args.guidance or [model.val_guidance])]


def run(args: argparse.Namespace) -> int:
    out = check_output_file(args.out, "--out", (".png",))  # before the (slow) model load
    if out.with_suffix("").exists() and not out.with_suffix("").is_dir():
        raise UserError(f"--out: '{out.with_suffix('')}' (the folder for the single images) is a file; move it or "
                        "choose another --out")
    if out.with_suffix("").is_dir():  # replaced as a whole at the end: only an earlier `sample`'s images may be in it
        foreign = sorted(p.name for p in out.with_suffix("").iterdir() if not SINGLE_IMAGE.fullmatch(p.name))
        if foreign:
            raise UserError(f"--out: '{out.with_suffix('')}' (the folder for the single images, replaced by this "
                            f"call) holds files sample did not write ({', '.join(foreign[:3])}"
                            f"{' ...' if len(foreign) > 3 else ''}): move them or choose another --out")
    if args.lowres is not None and not Path(args.lowres).is_file():
        raise UserError(f"--lowres image '{args.lowres}' does not exist")
    model = load_denoiser(args.ckpt, vae_checkpoint=args.vae_checkpoint, clip_checkpoint=args.clip_checkpoint,
                          text_encoder_path=args.text_encoder_path)
    for guidance in args.guidance or [None]:
        check_sampling(model.hparams, sampler=args.sampler, guidance=guidance, prefix="--")
    options = sampling_overrides(args)
    check_overrides(model.hparams, options)
    rows = _rows(args, model)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model.to(device)
    lowres = _load_lowres(args.lowres, model.hparams.lowres_size) if "lowres" in model.kinds else None
    classifier = NoisyClassifier.load_frozen(args.classifier) if args.classifier else None
    if classifier is not None:
        check_pair(model, classifier)

    singles = out.with_suffix("")
    images, captions = [], []
    for row in rows:
        guide = guidance_wrapper(model, classifier, [row["label"]] * args.n, args.classifier_scale) if classifier else None
        images.append(model.generate(
            [row["prompt"]] * args.n if "prompt" in row else None,
            [row["label"]] * args.n if "label" in row and "class" in model.kinds else None,
            lowres.expand(args.n, -1, -1, -1) if lowres is not None else None,
            num_samples=args.n, guidance=row["guidance"], seed=args.seed, progress=True, model_wrapper=guide,
            **options,
        ))
        condition = " ".join(f"{key}={row[key]!r}" for key in ("prompt", "label") if key in row)
        captions.append(f"row {len(captions)}: {condition} guidance={row['guidance']:g}".replace(":  ", ": "))
    columns = math.ceil(math.sqrt(args.n)) if len(rows) == 1 else args.n
    sampler = args.sampler or model.hparams.val_sampler
    steps = args.steps or model.hparams.val_steps
    extra = "".join(f" {key}={value}" for key, value in options.items() if key not in ("sampler", "steps"))
    header = f"{args.ckpt} sampler={sampler} steps={steps}{extra} seed={args.seed} n={args.n}"
    if classifier is not None:
        header += f" classifier={args.classifier} classifier_scale={args.classifier_scale:g}"
    # everything goes to temporary names first: a full disk or an interrupt leaves the previous outputs intact
    with atomic_output(singles) as folder, atomic_output(out) as grid, atomic_output(out.with_suffix(".txt")) as text:
        folder.mkdir()
        for index, samples in enumerate(images):
            for k, image in enumerate(to_uint8(samples)):
                save_png(image, folder / f"row{index:02d}_{k:03d}.png")
        save_png(image_grid(torch.cat(images), columns), grid)
        text.write_text("\n".join([header, *captions]) + "\n")
    print(f"wrote {out} ({len(rows)} row(s) x {args.n}), captions {out.with_suffix('.txt')}, single images in {singles}/")
    return 0
