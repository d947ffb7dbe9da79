"""lightning_diffusion: VAE-GAN, CLIP and a conditional denoiser trained from one stream of webdataset shards."""

from lightning_diffusion.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
