"""`export --format open_clip`: a CLIP checkpoint -> a folder open_clip loads by itself, with no project code.

The folder holds `open_clip_config.json` (`model_cfg` + `preprocess_cfg`, the layout of open_clip's hub loader)
and `open_clip_model.safetensors` (the model's state dict). Load it with
`open_clip.create_model_and_transforms('local-dir:DIR')` and `open_clip.get_tokenizer('local-dir:DIR')`.
`model_cfg` is the architecture the checkpoint's hyper-parameters describe (image size and context length
overrides, EfficientNet/MiniLM tower starts, the loss's logit parameters); a MiniLM text tower names its local
all-MiniLM-L6-v2 folder, so that folder must exist where the export is loaded; its tokenizer files are copied
into the export folder, where open_clip's `local-dir:` tokenizer looks for them. The export reloads the folder in
open_clip and refuses to finish unless image and text features match the checkpoint's to 1e-5.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import open_clip
import torch

from lightning_diffusion.clip.encoders import _clip_checkpoint, _trained_architecture
from lightning_diffusion.clip.model_configs import model_config
from lightning_diffusion.clip.towers import _efficientnet_vision_cfg, _minilm_text_cfg, logit_init, minilm_dir
from lightning_diffusion.errors import UserError

CONFIG_NAME, WEIGHTS_NAME = "open_clip_config.json", "open_clip_model.safetensors"
TOLERANCE = 1e-5


def open_clip_model_cfg(arch: dict[str, Any]) -> dict[str, Any]:
    """The open_clip `model_cfg` of a CLIPModule's architecture arguments (see `towers.build_clip_model`)."""
    name = arch["model_name"]
    cfg = model_config(name)
    vision_size = arch.get("image_size") or cfg["vision_cfg"].get("image_size", 224)
    tokens = arch.get("context_length") or cfg["text_cfg"].get("context_length", 77)
    if arch.get("image_tower", "config") == "efficientnet_lite0":
        cfg["vision_cfg"] = _efficientnet_vision_cfg(vision_size)
    else:
        cfg["vision_cfg"]["image_size"] = vision_size
    if arch.get("text_tower", "config") == "minilm":
        cfg["text_cfg"] = _minilm_text_cfg(minilm_dir(arch.get("minilm_path")).resolve(), tokens, False)
        cfg["custom_text"] = True
    else:
        cfg["text_cfg"]["context_length"] = tokens
    pretrained = arch.get("pretrained")
    if pretrained and not os.path.isfile(pretrained):
        if (open_clip.get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu"):
            cfg["quick_gelu"] = True
    cfg.update(logit_init(arch.get("loss", "clip")))
    return cfg


def _features(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def export_open_clip(ckpt: Path, out: Path) -> str:
    """Write the open_clip folder of CLIP checkpoint `ckpt` into `out`; returns a summary line."""
    from safetensors.torch import save_file

    arch, state = _clip_checkpoint(ckpt)
    model = _trained_architecture(**{key: arch.get(key, default) for key, default in (
        ("model_name", "ld-tiny-vit"), ("loss", "clip"), ("image_tower", "config"), ("text_tower", "config"),
        ("image_size", None), ("context_length", None), ("minilm_path", None), ("pretrained", None),
        ("lock_image_tower", False), ("lock_text_tower", False))})
    model.load_state_dict(state, strict=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in model.visual.preprocess_cfg.items()}
    config = {"model_cfg": open_clip_model_cfg(arch), "preprocess_cfg": preprocess}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    if config["model_cfg"]["text_cfg"].get("hf_tokenizer_name"):  # open_clip reads a local-dir's HF tokenizer there
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(config["model_cfg"]["text_cfg"]["hf_tokenizer_name"]).save_pretrained(out)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_NAME))

    reloaded = open_clip.create_model(f"local-dir:{out}").eval()
    size = config["model_cfg"]["vision_cfg"]["image_size"]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=generator)
    tokens = open_clip.get_tokenizer(f"local-dir:{out}")(["a 3D rendered emoji of fox", "a flat emoji"])
    worst = max((a - b).abs().max().item() for a, b in zip(_features(model, images, tokens),
                                                           _features(reloaded, images, tokens)))
    if worst > TOLERANCE:
        raise UserError(f"the open_clip export of '{ckpt}' does not reproduce its features (max difference "
                        f"{worst:.2g} > {TOLERANCE}): report this with the checkpoint's model_name {arch['model_name']}")
    return (f"{arch['model_name']} as {CONFIG_NAME} + {WEIGHTS_NAME} (features match to {worst:.1g}); load with "
            "open_clip.create_model_and_transforms('local-dir:<--out>')")
