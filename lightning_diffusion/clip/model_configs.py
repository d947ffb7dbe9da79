"""The project's tiny CPU CLIP architectures, registered with open_clip's own config registry.

The JSON files next to this module use open_clip's config schema (`embed_dim`, `vision_cfg`, `text_cfg`), so
`open_clip.create_model("ld-tiny-vit")` and `open_clip.get_tokenizer("ld-tiny-vit")` work like any built-in name:

- `ld-tiny-vit`: ViT image tower (32 px, patch 4, width 128, 4 layers) + 4-layer width-128 text transformer, 32 tokens.
- `ld-tiny-rn`: open_clip's ModifiedResNet (one bottleneck per stage, width 16, 32 px) + the same text tower.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

from lightning_diffusion.errors import UserError

CONFIG_DIR = Path(__file__).parent / "model_configs"
PROJECT_MODELS: tuple[str, ...] = tuple(sorted(path.stem for path in CONFIG_DIR.glob("*.json")))


def register_project_configs() -> None:
    """Add the project's configs to open_clip's registry (idempotent)."""
    if not all(name in open_clip.list_models() for name in PROJECT_MODELS):
        open_clip.add_model_config(CONFIG_DIR)


def model_config(model_name: str) -> dict:
    """A copy of the open_clip config for `model_name` (built-in or project); a `UserError` if there is none."""
    register_project_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise UserError(
            f"model_name '{model_name}' is not an open_clip model config: use one of the project's "
            f"{', '.join(PROJECT_MODELS)} or a name from open_clip.list_models() (e.g. ViT-B-32)"
        )
    return config
