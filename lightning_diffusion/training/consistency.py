"""Settings both the model and the data need must agree: checked once both are built, before anything runs.

`image_size` is the pixel size of the images in every stage: the VAE-GAN's input, the CLIP image tower's input
when set (None = the tower's own size, the images are resized to it), and for the denoiser the images it
denoises (pixel space) or encodes with its VAE (latent space). The data's `image_size` is the size it decodes
images to. Both stay settable (a config names them in its two sections); a mismatch is one `UserError` instead of
a model that trains at another size than it was built for. Pre-encoded latent shards hold no images
(`image_keys: []`): their latent shape is checked against the model by the denoiser's own `setup`.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule

from lightning_diffusion.errors import UserError


def data_image_size(datamodule: Any) -> int | None:  # noqa: ANN401 - any LightningDataModule
    """The size the data decodes images to, or None when it loads no images (latent shards, other data)."""
    decoder = getattr(datamodule, "decoder", None)
    if decoder is None or not getattr(decoder, "image_keys", ()):
        return None
    size = getattr(decoder, "image_size", None)
    return size if isinstance(size, int) else None


def check_model_matches_data(model: LightningModule, datamodule: LightningDataModule | None) -> None:
    """A `UserError` naming both keys when the model's `image_size` differs from the data's."""
    model_size = getattr(model, "hparams", {}).get("image_size")
    data_size = data_image_size(datamodule)
    if model_size is None or data_size is None or isinstance(model_size, bool) or model_size == data_size:
        return
    raise UserError(f"model.init_args.image_size is {model_size} but data.init_args.image_size is {data_size}: "
                    f"set both to the pixel size of the training images (e.g. --data.init_args.image_size "
                    f"{model_size}); the latent denoiser's image_size is the pixel size, not the latent size")
