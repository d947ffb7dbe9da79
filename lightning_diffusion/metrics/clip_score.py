"""CLIP score with the project's own CLIP towers: `100 * max(cos(image, caption), 0)`, averaged.

torchmetrics' `CLIPScore` needs transformers and a hub model (`openai/clip-vit-*`), which cannot be had offline;
this metric keeps its convention (scale 100, negative cosines clipped to 0) on any pair of encoders, so the
number is named after the CLIP it used: `clip_score_<encoder>@<count>`. With a hub model at hand, use
`torchmetrics.multimodal.CLIPScore(model_name_or_path=lambda: (model, processor))` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_diffusion.metrics.keys import metric_key


class ProjectCLIPScore(Metric):
    """Mean CLIP score of (image, caption) pairs; images in [-1, 1], states float64, summed across ranks.

    `image_embed` maps [-1, 1] images to embeddings and `text_embed` maps captions to embeddings (both are
    L2-normalised again here, so unnormalised towers work too).
    """

    higher_is_better = True
    full_state_update = False

    def __init__(
        self, image_embed: Callable[[Tensor], Tensor], text_embed: Callable[[list[str]], Tensor],
        encoder_name: str = "clip",
    ) -> None:
        super().__init__()
        self.image_embed = image_embed
        self.text_embed = text_embed
        self.encoder_name = encoder_name
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, images: Tensor, captions: Sequence[str]) -> None:
        if images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        with torch.autocast(device_type=images.device.type, enabled=False):
            image_features = F.normalize(self.image_embed(images.float().clamp(-1, 1)).double(), dim=-1)
            text_features = F.normalize(self.text_embed(list(captions)).double(), dim=-1)
        cosine = (image_features * text_features.to(image_features.device)).sum(-1)
        self.score_sum += (100 * cosine.clamp(min=0)).sum()
        self.count += cosine.shape[0]

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            raise RuntimeError("CLIP score needs at least one (image, caption) pair")
        return self.score_sum / self.count

    def key(self, num_samples: int) -> str:
        return metric_key("clip_score", self.encoder_name, num_samples)
