"""The text tower of an open_clip model loaded from its weights, as a frozen text encoder (e.g. ViT-L-14's).

`path` is either a weights file (safetensors, or a weights-only `.bin`/`.pt` state dict) with the open_clip
architecture name in `arch` (`open_clip.create_model(arch, pretrained=path)`; OpenAI-trained weights need the
`-quickgelu` variant, e.g. `ViT-L-14-quickgelu`), or a folder in open_clip's hub layout (`open_clip_config.json`
+ `open_clip_model.safetensors`, as `export --format open_clip` writes; `create_model('local-dir:path')`).
States and pooled vector are those of `CLIPTextEncoder`: final-LN token states and the unnormalised `encode_text`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import open_clip
from open_clip.factory import _find_checkpoint_in_dir
from torch import nn

from lightning_diffusion.clip.encoders import CLIPTextEncoder
from lightning_diffusion.clip.model_configs import model_config
from lightning_diffusion.errors import UserError
from lightning_diffusion.training.checkpoints import check_checkpoint, refused

LAYOUT = ("an open_clip weights file (.safetensors, or a weights-only .bin/.pt) with model.text_encoder_arch set to "
          "its architecture (e.g. ViT-L-14), or a folder holding open_clip_config.json + open_clip_model.safetensors")


def _check_weights(file: Path, key: str) -> None:
    if file.suffix != ".safetensors":
        check_checkpoint(file, what="open_clip weights", key=key)  # open_clip then loads it weights-only


def load_open_clip(path: str | None, arch: str | None, key: str) -> tuple[nn.Module, object, dict]:
    """(open_clip model with the weights, its tokenizer, its model config) for a file + `arch` or a folder."""
    if not path or not Path(path).exists():
        raise UserError(f"{key} {'is not set' if not path else repr(path) + ' does not exist'}: expected {LAYOUT}")
    source = Path(path)
    if source.is_dir():
        config_file = source / "open_clip_config.json"
        if not config_file.is_file():
            raise UserError(f"{key} '{source}' lacks open_clip_config.json: expected {LAYOUT}")
        try:
            config = json.loads(config_file.read_text())["model_cfg"]
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"{key}: '{config_file}' is not an open_clip config (JSON with model_cfg): "
                            f"expected {LAYOUT}") from err
        weights = _find_checkpoint_in_dir(source)
        if weights is None:
            raise UserError(f"{key} '{source}' has no weights file (open_clip_model.safetensors): expected {LAYOUT}")
        name, pretrained = f"local-dir:{source}", None
    else:
        if not arch:
            raise UserError(f"{key} '{source}' is a weights file: set model.text_encoder_arch to its open_clip "
                            "architecture (e.g. ViT-L-14, or ViT-L-14-quickgelu for OpenAI weights)")
        config = model_config(arch)
        weights, name, pretrained = str(source), arch, str(source)
    _check_weights(Path(weights), key)
    try:
        model = open_clip.create_model(name, pretrained=pretrained)
    except pickle.UnpicklingError as err:
        raise refused(weights, "open_clip weights", key, err) from err
    except (RuntimeError, ValueError, KeyError, AssertionError) as err:  # open_clip asserts on shape mismatches
        raise UserError(f"{key}: '{weights}' could not be loaded into {arch or 'its open_clip_config.json model'} "
                        f"({str(err).splitlines()[0]}): check that the weights belong to this architecture") from err
    return model, open_clip.get_tokenizer(name), config


class OpenCLIPTextEncoder(CLIPTextEncoder):
    """See the module doc; the forward, mask and state-dict keys are `CLIPTextEncoder`'s."""

    def __init__(self, path: str, arch: str | None = None, key: str = "model.text_encoder_path") -> None:
        nn.Module.__init__(self)
        model, self.tokenizer, config = load_open_clip(path, arch, key)
        self.context_length = int(self.tokenizer.context_length)
        self.pooled_dim = int(config["embed_dim"])
        self.adopt_text_tower(model)
