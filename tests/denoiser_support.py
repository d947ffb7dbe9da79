"""Shared pieces of the denoiser tests: a tiny stand-in text encoder, tiny model arguments, fixed batches."""

from __future__ import annotations

import contextlib
import zlib
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

TINY_UNET = dict(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                 num_heads=2, val_steps=4, samples_per_prompt=2, grid_every_n_steps=1, val_timesteps=4)


class WordTokenizer:
    """Words to ids 1..97 by CRC32, padded with 0 to 8 tokens (the padding id the denoiser masks out)."""

    context_length = 8

    def __call__(self, texts: list[str]) -> torch.Tensor:
        tokens = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [zlib.crc32(word.encode()) % 97 + 1 for word in text.lower().split()][: self.context_length]
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens


class ToyTextEncoder(nn.Module):
    """The text-encoder interface (tokenizer, context_length, width, forward -> (states, pooled)) in 1.6k params."""

    width = 16

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(98, self.width)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(98, self.width, generator=generator))
        self.tokenizer = WordTokenizer()
        self.context_length = WordTokenizer.context_length

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.embed(tokens)
        mask = (tokens != 0).unsqueeze(-1).float()
        return states, (states * mask).sum(1) / mask.sum(1).clamp(min=1)

    def token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens != 0


def use_toy_text_encoder(monkeypatch: Any) -> None:
    """Make text-conditioned denoisers load the toy encoder instead of MiniLM / CLIP."""
    import lightning_diffusion.diffusion.module as module

    monkeypatch.setattr(module, "load_text_encoder", lambda hparams: ToyTextEncoder())


def fixed_batch(batch_size: int = 8, seed: int = 0) -> dict[str, Any]:
    """Smooth 16 px images in [-1, 1] with captions and labels (the DataModule's batch format)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, 4, 4, generator=generator) * 2 - 1
    image = nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    captions = [f"a {style} emoji of {thing}" for style, thing in
                zip(["flat", "3D rendered"] * batch_size, ["koala", "apple", "cat", "dog"] * batch_size)][:batch_size]
    return {"image": image, "caption": captions, "label": torch.arange(batch_size) % 3,
            "key": [str(i) for i in range(batch_size)]}


def trainer(tmp_path: Any, max_steps: int, **overrides: Any) -> pl.Trainer:
    args = dict(max_steps=max_steps, accelerator="cpu", devices=1, precision="32-true", logger=False,
                enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
    args.update(overrides)
    return pl.Trainer(**args)


def loader(batch: dict[str, Any], repeats: int) -> torch.utils.data.DataLoader:
    """The same batch ``repeats`` times (already batched: ``batch_size=None``)."""
    return torch.utils.data.DataLoader([batch] * repeats, batch_size=None)


@contextlib.contextmanager
def one_thread() -> Any:
    """Tiny models run fastest on one thread, and several test runs share this machine's two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
