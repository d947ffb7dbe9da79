"""Score a model on real batches: reconstructions (VAE-GAN) or generated samples (denoiser), DDP-safe.

A model plugs in by what it can do, not by its class:
- `reconstruct(images) -> images` (all in [-1, 1]): reconstruction metrics (PSNR, SSIM, LPIPS) and the Fréchet /
  kernel distance of reconstructions to the real images;
- `generate(captions=..., labels=..., lowres=..., num_samples=..., seed=..., first_index=...) -> images` (the denoiser): one
  sample per real caption (or label), Fréchet / kernel distance to the real images and the CLIP score of the
  samples against their captions.
Every metric is a torchmetrics `Metric` updated outside autocast and computed on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from lightning_diffusion.errors import UserError
from lightning_diffusion.metrics.frechet import FrechetSuite, sum_over_ranks, to_unit_range
from lightning_diffusion.metrics.keys import metric_key

RECONSTRUCTION_METRICS = ("fid", "kid", "lpips", "perceptual", "psnr", "ssim")
GENERATION_METRICS = ("fid", "kid", "clip_score")


def model_task(model: nn.Module) -> str:
    """`reconstruction` for models with `reconstruct`, `generation` for models with `generate`."""
    if callable(getattr(model, "reconstruct", None)):
        return "reconstruction"
    if callable(getattr(model, "generate", None)):
        return "generation"
    raise UserError(
        f"{type(model).__name__} has neither `reconstruct(images)` (autoencoders) nor `generate(...)` "
        "(denoisers): evaluate cannot score it"
    )


def check_metrics(task: str, metrics: list[str]) -> None:
    allowed = RECONSTRUCTION_METRICS if task == "reconstruction" else GENERATION_METRICS
    wrong = [m for m in metrics if m not in allowed]
    if wrong:
        raise UserError(f"--metrics {','.join(wrong)} do not apply to a {task} model: choose from {', '.join(allowed)}")


def generation_inputs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """The conditions of one real batch that the denoiser was trained on (text, class, low-res), else a count."""
    kinds = getattr(model, "kinds", ("text",))
    inputs: dict[str, Any] = {}
    if "text" in kinds:
        inputs["captions"] = list(batch["caption"])
    if "class" in kinds:
        if "label" not in batch:
            raise UserError("the denoiser is class-conditioned but the shards have no labels (json 'label' or cls)")
        inputs["labels"] = batch["label"]
    if "lowres" in kinds:
        size = int(model.hparams.lowres_size)
        inputs["lowres"] = F.interpolate(batch["image"], size=(size, size), mode="bilinear", antialias=True)
    if not inputs:
        inputs["num_samples"] = batch["image"].shape[0]
    return inputs


class Evaluator:
    """Holds the metrics of one evaluation; `update(real, produced, captions)` per batch, `compute()` on all ranks."""

    def __init__(
        self,
        metrics: list[str],
        device: torch.device,
        frechet: FrechetSuite | None = None,
        lpips: Metric | None = None,
        lpips_name: str | None = None,
        clip_score: Metric | None = None,
        perceptual: Metric | None = None,
        frechet_role: str | None = None,
    ) -> None:
        self.metrics, self.frechet_role = metrics, frechet_role
        self.seen = 0  # images scored on this rank
        self.frechet = frechet
        self.lpips, self.lpips_name = lpips, lpips_name
        self.clip_score = clip_score
        self.perceptual = perceptual
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)).to(device) if "psnr" in metrics else None
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device) if "ssim" in metrics else None
        for metric in (self.psnr, self.ssim):
            if metric is not None:
                metric.set_dtype(torch.float64)

    @torch.no_grad()
    def update(self, real: Tensor, produced: Tensor, captions: list[str] | None = None) -> None:
        """`real` and `produced` in [-1, 1]; clamped and range-converted once here, per metric."""
        self.seen += produced.shape[0]
        with torch.autocast(device_type=produced.device.type, enabled=False):
            produced = produced.float().clamp(-1, 1)
            real = real.float().clamp(-1, 1)
            if self.frechet is not None:
                self.frechet.update(produced, real=False)
            if self.psnr is not None or self.ssim is not None:
                real_unit, produced_unit = to_unit_range(real).double(), to_unit_range(produced).double()
                if self.psnr is not None:
                    self.psnr.update(produced_unit, real_unit)
                if self.ssim is not None:
                    self.ssim.update(produced_unit, real_unit)
            if self.lpips is not None:
                self.lpips.update(produced, real)  # LPIPS takes [-1, 1]
            if self.perceptual is not None:
                self.perceptual.update(produced, real)
            if self.clip_score is not None:
                if captions is None:
                    raise UserError("clip_score needs captions: the shards have none, or the model is not "
                                    "text-conditioned")
                self.clip_score.update(produced, captions)

    def total_seen(self) -> int:
        return sum_over_ranks(self.seen)

    def compute(self) -> dict[str, float]:
        """Every metric's value under its key (encoder and the number of images scored, all ranks, in the name).
        Call on every rank."""
        n = self.total_seen()
        results: dict[str, float] = {}
        if self.frechet is not None:
            results.update(self.frechet.compute(n, self.frechet_role))
        if self.lpips is not None:
            results[metric_key("lpips", self.lpips_name, n)] = float(self.lpips.compute())
        if self.perceptual is not None:
            results[self.perceptual.key(n)] = float(self.perceptual.compute())
        if self.psnr is not None:
            results[metric_key("psnr", None, n)] = float(self.psnr.compute())
        if self.ssim is not None:
            results[metric_key("ssim", None, n)] = float(self.ssim.compute())
        if self.clip_score is not None:
            results[self.clip_score.key(n)] = float(self.clip_score.compute())
        return results


def run_evaluation(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    evaluator: Evaluator,
    samples_per_rank: int,
    seed: int = 0,
    rank: int = 0,
    progress: Callable[[int], None] | None = None,
    generate_options: dict[str, Any] | None = None,
    guide: Callable[[dict[str, Any]], Any] | None = None,
) -> int:
    """Feed up to `samples_per_rank` real images (and what the model makes of them) to `evaluator`; returns the
    number of images this rank scored. Generated sample i of rank r draws from the per-sample stream of index
    `r * samples_per_rank + i` (`diffusion/seeding.py`): the same images whatever the batch size;
    `generate_options` (guidance, sampler, steps, ...) go to `model.generate`; `guide(batch)`, when given, is its
    `model_wrapper` for that batch (classifier guidance towards the batch's labels).
    """
    task = model_task(model)
    device = next(model.parameters()).device
    seen = 0
    for batch in batches:
        take = min(samples_per_rank - seen, batch["image"].shape[0])
        batch = {k: v[:take] for k, v in batch.items()}
        real = batch["image"].to(device)
        with torch.no_grad():
            if task == "reconstruction":
                produced = model.reconstruct(real)
            else:
                inputs = {k: v.to(device) if isinstance(v, Tensor) else v
                          for k, v in generation_inputs(model, {**batch, "image": real}).items()}
                wrapper = {"model_wrapper": guide(batch)} if guide is not None else {}
                produced = model.generate(**inputs, **(generate_options or {}), **wrapper, seed=seed,
                                          first_index=rank * samples_per_rank + seen)
        captions = list(batch["caption"]) if "caption" in batch else None
        evaluator.update(real, produced, captions)
        seen += take
        if progress is not None:
            progress(take)
        if seen >= samples_per_rank:
            break
    return seen
