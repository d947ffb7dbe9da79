"""A Hugging Face `CLIPTextModel` folder (Stable Diffusion 1.x/2.x `text_encoder/` + `tokenizer/`) as a frozen
text encoder.

States: the last hidden state (`layer: last`: SD 1.x, and SD 2.x, whose diffusers `text_encoder/` already lacks
ViT-H's last layer: 23 of 24), or the penultimate layer's hidden state passed through the final layer norm
(`layer: penultimate`, what diffusers does for `clip_skip=1`). Pooled: `pooler_output`,
the final-layer state at the first end-of-text token (width D). The mask marks the tokens up to that end-of-text
token: padding after it (SD 1.x pads with end-of-text, SD 2.x with `!`) is not attended to.
"""

from __future__ import annotations

import torch

from lightning_diffusion.text_encoders.base import TextEncoder, up_to_first
from lightning_diffusion.text_encoders.hf_folder import check_model_type, load_model, model_folders

LAYOUT = ("a Hugging Face CLIPTextModel folder: config.json + model.safetensors (or pytorch_model.bin), with the "
          "tokenizer (vocab.json + merges.txt or tokenizer.json) in the same folder or in ../tokenizer, as in "
          "Stable Diffusion's text_encoder/ + tokenizer/")


class HFCLIPTextEncoder(TextEncoder):
    """See the module doc; `layer` is `last` or `penultimate`."""

    def __init__(self, path: str, layer: str = "last", key: str = "model.text_encoder_path") -> None:
        super().__init__()
        from open_clip.tokenizer import HFTokenizer
        from transformers import CLIPTextModel

        model_dir, tokenizer_dir = model_folders(path, key, LAYOUT)
        check_model_type(model_dir, key, ("clip_text_model", "clip"), LAYOUT)
        self.model = load_model(CLIPTextModel, model_dir, key)
        config = self.model.config
        tokenizer = HFTokenizer(str(tokenizer_dir), context_length=None)
        self.context_length = int(min(tokenizer.tokenizer.model_max_length, config.max_position_embeddings))
        tokenizer.context_length = self.context_length
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.tokenizer.eos_token_id)
        self.layer = layer
        self.width = self.pooled_dim = int(config.hidden_size)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        penultimate = self.layer == "penultimate"
        out = self.model(input_ids=tokens, output_hidden_states=penultimate)
        if not penultimate:
            return out.last_hidden_state, out.pooler_output
        text_model = getattr(self.model, "text_model", self.model)  # transformers 5 flattened CLIPTextModel
        return text_model.final_layer_norm(out.hidden_states[-2]), out.pooler_output

    def token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        return up_to_first(tokens, self.eos_id)
