"""Frozen text encoders for the denoiser, behind one interface (`TextEncoder`), chosen by plain arguments.

`model.text_encoder` names the kind and `model.text_encoder_path` (with `text_encoder_arch`, `text_layer`) the
files, so a LightningCLI config never names a class:

| kind | path | states / pooled |
|---|---|---|
| `clip` | the project's CLIP checkpoint (`model.clip_checkpoint`) | final-LN token states / `encode_text` |
| `minilm` | optional all-MiniLM-L6-v2 folder | last hidden states / normalised mean |
| `open_clip` | an open_clip weights file (+ `text_encoder_arch`, e.g. ViT-L-14) or an open_clip folder | as `clip` |
| `hf_clip` | a Hugging Face `CLIPTextModel` folder (SD 1.x/2.x `text_encoder/` + `tokenizer/`) | last or penultimate layer / EOS state |
| `t5` | a Hugging Face `T5EncoderModel` folder + its tokenizer | last hidden states / mean over real tokens |
"""

from lightning_diffusion.text_encoders.base import TextEncoder
from lightning_diffusion.text_encoders.spec import TextEncoderName, TextEncoderSpec, TextLayer, text_dims

__all__ = ["TextEncoder", "TextEncoderName", "TextEncoderSpec", "TextLayer", "text_dims"]
