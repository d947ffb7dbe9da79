"""A Hugging Face `T5EncoderModel` folder (+ its tokenizer) as a frozen text encoder, as in Imagen.

States: the encoder's last hidden state, run with the padding mask. Pooled: T5 has no pooled output, so it is the
mean of the states over the real (non-padding) tokens (not normalised). Prompts are cut at `context_length`
tokens (77 by default, as CLIP's), the end-of-sequence token kept.
"""

from __future__ import annotations

import torch

from lightning_diffusion.text_encoders.base import TextEncoder
from lightning_diffusion.text_encoders.hf_folder import check_model_type, load_model, model_folders

LAYOUT = ("a Hugging Face T5EncoderModel folder: config.json + model.safetensors (or pytorch_model.bin), with its "
          "tokenizer (spiece.model or tokenizer.json) in the same folder or in ../tokenizer")
CONTEXT_LENGTH = 77


class T5TextEncoder(TextEncoder):
    """See the module doc."""

    def __init__(self, path: str, context_length: int = CONTEXT_LENGTH, key: str = "model.text_encoder_path") -> None:
        super().__init__()
        from open_clip.tokenizer import HFTokenizer
        from transformers import T5EncoderModel

        model_dir, tokenizer_dir = model_folders(path, key, LAYOUT)
        check_model_type(model_dir, key, ("t5", "mt5", "umt5"), LAYOUT)
        self.model = load_model(T5EncoderModel, model_dir, key)
        self.tokenizer = HFTokenizer(str(tokenizer_dir), context_length=context_length)
        self.context_length = context_length
        self.pad_id = int(self.tokenizer.tokenizer.pad_token_id)
        self.width = self.pooled_dim = int(self.model.config.d_model)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.token_mask(tokens)
        states = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        return states, (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens != self.pad_id
