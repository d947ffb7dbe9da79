"""CLIP stage: open_clip models trained with CLIP or SigLIP losses, and frozen encoders for the denoiser."""

from lightning_diffusion.clip.encoders import CLIPImageEncoder, CLIPTextEncoder, MiniLMTextEncoder
from lightning_diffusion.clip.module import CLIPModule

__all__ = ["CLIPImageEncoder", "CLIPModule", "CLIPTextEncoder", "MiniLMTextEncoder"]
