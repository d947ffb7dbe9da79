"""Score one trained denoiser under several sampling settings: Fréchet distance, CLIP score, network evaluations.

Shared by P5 (`sampler_quality.py`: quality vs number of network evaluations) and the guidance sweep
(`guidance_sweep.py`). The model, the feature encoder, the real statistics (the `evaluate` command's cache) and
the CLIP towers are loaded once; every setting then generates one sample per caption of the same first
`num_samples` real images with the same seeds, so settings differ only in how they sample.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from lightning_diffusion.commands.evaluate import load_model
from lightning_diffusion.metrics.encoders import build_encoder
from lightning_diffusion.metrics.evaluation import Evaluator, run_evaluation
from lightning_diffusion.metrics.frechet import FrechetSuite
from lightning_diffusion.metrics.sources import project_clip_score, real_loader, real_statistics


def add_scoring_arguments(parser: argparse.ArgumentParser, runs: str = "runs/quickstart") -> None:
    parser.add_argument("--ckpt", default=f"{runs}/denoiser/checkpoints/last.ckpt", help="a denoiser checkpoint")
    parser.add_argument("--clip-ckpt", default=f"{runs}/clip/checkpoints/last.ckpt",
                        help="the project's CLIP, for the CLIP score ('' to skip it)")
    parser.add_argument("--data", default="data/emoji/val-*.tar", help="real image-caption shards (held-out concepts)")
    parser.add_argument("--num-samples", type=int, default=256, help="samples per setting (quick: 16)")
    parser.add_argument("--encoder", default="effnet", choices=("effnet", "inception", "clip"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)


class CountingForward:
    """Wraps a module's forward to count network evaluations (a batched CFG forward counts once)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls, self.inner = 0, model.forward
        model.forward = self  # instance attribute: `model(...)` and `model.forward(...)` both come here

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)


class GenerationScorer:
    """`score(**generate options)` -> metrics, network evaluations per sample batch, seconds."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = torch.device("cpu")
        self.model = load_model(Path(args.ckpt), "lightning_diffusion.diffusion.module.Denoiser", self.device)
        self.counter = CountingForward(self.model)
        self.image_size = int(self.model.hparams.image_size)
        encoder = build_encoder(args.encoder, clip_checkpoint=args.clip_ckpt or None).to(self.device)
        self.suite = FrechetSuite(encoder, ("fid",))
        stats, _ = real_statistics(self.suite, args.data, self.image_size, args.num_samples, self.device,
                                   batch_size=args.batch_size, key="--data")
        self.suite.load_real(stats)
        self.clip_score = project_clip_score(args.clip_ckpt, self.device) if args.clip_ckpt else None
        self.args = args

    def score(self, **options: Any) -> dict[str, Any]:
        args = self.args
        self.suite.reset()
        if self.clip_score is not None:
            self.clip_score.reset()
        evaluator = Evaluator(["fid", *(["clip_score"] if self.clip_score is not None else [])], self.device,
                              frechet=self.suite, clip_score=self.clip_score)
        loader = real_loader(args.data, self.image_size, args.batch_size, args.num_samples)
        self.counter.calls = 0
        started = time.perf_counter()
        run_evaluation(self.model, loader, evaluator, args.num_samples, args.seed, generate_options=options)
        seconds = time.perf_counter() - started
        batches = -(-args.num_samples // min(args.batch_size, args.num_samples))
        metrics = evaluator.compute()
        fd = next(value for key, value in metrics.items() if key.startswith(("fd_", "fid_")))
        clip = next((value for key, value in metrics.items() if key.startswith("clip_score")), None)
        return {**options, "nfe": self.counter.calls // batches, "fd": round(fd, 3),
                "clip_score": None if clip is None else round(clip, 3), "metrics": metrics,
                "seconds": round(seconds, 1)}

    def describe(self) -> dict[str, Any]:
        hp = self.model.hparams
        return {"checkpoint": self.args.ckpt, "objective": hp.objective, "schedule": hp.schedule,
                "space": hp.space, "conditioning": hp.conditioning, "image_size": self.image_size,
                "data": self.args.data, "num_samples": self.args.num_samples, "encoder": self.suite.encoder.name,
                "parameters": sum(p.numel() for p in self.model.parameters())}
