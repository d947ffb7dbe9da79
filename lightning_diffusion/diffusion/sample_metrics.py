"""`SampleMetrics`: Fréchet distance and CLIP score of generated samples, measured during training.

The validation loss of a denoiser says little about sample quality; this callback samples from the (EMA) model
every `every_n_steps` at validation time, one image per caption of the first `num_samples` real images of
`data` (held-out concepts for the emoji split), and logs `val/fd_<encoder>@N` (and `val/kd_...`) against those
real images and `val/clip_score_clip@N` against their captions. It shares the `evaluate` command's code and its
real-statistics cache, so a number logged here equals what `evaluate` prints for the same checkpoint and settings.
Under DDP every rank generates its share and the metrics are reduced across ranks.

    trainer:
      callbacks:
        - class_path: lightning_diffusion.diffusion.sample_metrics.SampleMetrics
          init_args: {data: data/emoji/val-*.tar, num_samples: 256, encoder: effnet, clip_checkpoint: ...}
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_diffusion.diffusion.sampling import SamplerName
from lightning_diffusion.errors import UserError
from lightning_diffusion.metrics.evaluation import Evaluator, run_evaluation


class SampleMetrics(Callback):
    """Sample-quality metrics of a denoiser at validation time; see the module docstring."""

    def __init__(
        self,
        data: str | list[str],
        num_samples: int = 256,
        every_n_steps: int = 500,
        metrics: tuple[str, ...] = ("fid", "clip_score"),
        encoder: Literal["effnet", "inception", "clip"] = "effnet",
        clip_checkpoint: str | None = None,
        inception_weights: str | None = None,
        guidance: float | None = None,
        sampler: SamplerName | None = None,
        steps: int | None = None,
        batch_size: int = 64,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise UserError(f"SampleMetrics.num_samples must be an integer >= 2, got {num_samples!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise UserError(f"SampleMetrics.every_n_steps must be a positive integer, got {every_n_steps!r}")
        unknown = set(metrics) - {"fid", "kid", "clip_score"}
        if unknown or not metrics:
            raise UserError(f"SampleMetrics.metrics: unknown {sorted(unknown) or 'empty list'}; "
                            "choose from fid, kid, clip_score")
        if ("clip_score" in metrics or encoder == "clip") and not clip_checkpoint:
            raise UserError("SampleMetrics: clip_score and encoder 'clip' need clip_checkpoint (a checkpoint of the "
                            "clip stage)")
        self.data, self.num_samples, self.every_n_steps = data, num_samples, every_n_steps
        self.metrics, self.encoder_name = tuple(metrics), encoder
        self.clip_checkpoint, self.inception_weights, self.cache_dir = clip_checkpoint, inception_weights, cache_dir
        self.options = {k: v for k, v in (("guidance", guidance), ("sampler", sampler), ("steps", steps)) if v is not None}
        self.batch_size, self.seed = batch_size, seed
        self._evaluator: Evaluator | None = None
        self._last_step: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "generate", None)):
            raise UserError(f"SampleMetrics needs a model with generate(), not {type(pl_module).__name__}")
        from lightning_diffusion.diffusion.arguments import check_sampling

        check_sampling(pl_module.hparams, **self.options, prefix="SampleMetrics.")

    def _build(self, pl_module: LightningModule) -> Evaluator:
        from lightning_diffusion.metrics.encoders import build_encoder
        from lightning_diffusion.metrics.frechet import FrechetSuite
        from lightning_diffusion.metrics.sources import project_clip_score, real_statistics

        device = pl_module.device
        frechet = tuple(m for m in self.metrics if m in ("fid", "kid"))
        suite = None
        if frechet:
            encoder = build_encoder(self.encoder_name, inception_weights=self.inception_weights,
                                    clip_checkpoint=self.clip_checkpoint).to(device)
            suite = FrechetSuite(encoder, frechet).to(device)
            stats, _ = real_statistics(suite, self.data, self.image_size(pl_module), self.num_samples, device,
                                       need_features="kid" in frechet, cache_dir=self.cache_dir,
                                       batch_size=self.batch_size, key="SampleMetrics.data")
            suite.load_real(stats)
        clip_score = project_clip_score(self.clip_checkpoint, device, key="SampleMetrics.clip_checkpoint") \
            if "clip_score" in self.metrics else None
        return Evaluator(list(self.metrics), device, frechet=suite, clip_score=clip_score)

    @staticmethod
    def image_size(pl_module: LightningModule) -> int:
        return int(pl_module.hparams.get("image_size", 32))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        due = self._last_step is None or step - self._last_step >= self.every_n_steps
        if trainer.sanity_checking or not due:
            return
        self._last_step = step
        started = time.perf_counter()
        if self._evaluator is None:
            self._evaluator = self._build(pl_module)
        evaluator = self._evaluator
        for metric in (evaluator.frechet, evaluator.clip_score):
            if metric is not None:
                metric.reset()
        evaluator.seen = 0
        world = trainer.world_size
        per_rank = math.ceil(self.num_samples / world)
        from lightning_diffusion.metrics.sources import real_loader

        loader = real_loader(self.data, self.image_size(pl_module), self.batch_size, self.num_samples,
                             key="SampleMetrics.data")
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                run_evaluation(pl_module, loader, evaluator, per_rank, self.seed, trainer.global_rank,
                               generate_options=self.options)
        finally:
            pl_module.train(was_training)
        results = evaluator.compute()
        for key, value in results.items():
            pl_module.log(f"val/{key}", value, sync_dist=False, rank_zero_only=False)
        summary = ", ".join(f"{key} {value:.4g}" for key, value in results.items())
        rank_zero_info(f"step {step}: {summary} ({time.perf_counter() - started:.1f} s)")

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
