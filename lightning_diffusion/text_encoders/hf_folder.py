"""Hugging Face model folders (`config.json` + weights + tokenizer files) read offline and weights-only.

Accepted layouts, for `model.text_encoder_path: P`:
- P holds `config.json` and the weights, and the tokenizer files too (a model repo such as
  `openai/clip-vit-large-patch14` or `google/t5-v1_1-base`), or the tokenizer lies beside it in `P/../tokenizer`
  (Stable Diffusion's `text_encoder/` + `tokenizer/`);
- P is a pipeline folder holding `text_encoder/` and `tokenizer/`.

Weights: `model.safetensors` (or a sharded `model.safetensors.index.json`) through `from_pretrained(...,
use_safetensors=True)`; a `pytorch_model.bin` pickle through the project's weights-only `load_checkpoint`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lightning_diffusion.errors import UserError
from lightning_diffusion.training.checkpoints import load_checkpoint

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLE = "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")


def model_folders(path: str | None, key: str, layout: str) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of `path` (see the module doc); a `UserError` naming what is missing."""
    if not path:
        raise UserError(f"{key} is not set: point it at {layout}")
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{key} '{root}' is not a folder: point it at {layout}")
    if (root / "text_encoder" / "config.json").is_file():
        model, tokenizer = root / "text_encoder", root / "tokenizer"
    elif (root / "config.json").is_file():
        model = root
        has_tokenizer = any((root / name).is_file() for name in TOKENIZER_FILES)
        tokenizer = root if has_tokenizer else root.parent / "tokenizer"
    else:
        raise UserError(f"{key} '{root}' lacks config.json: expected {layout}")
    if not any((model / name).is_file() for name in (*SAFETENSORS, PICKLE)):
        raise UserError(f"{key}: '{model}' has config.json but no weights ({', '.join((*SAFETENSORS, PICKLE))}): "
                        f"expected {layout}")
    if not tokenizer.is_dir() or not any((tokenizer / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{key}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in '{root}' nor in "
                        f"'{tokenizer}': expected {layout}")
    return model, tokenizer


def check_model_type(folder: Path, key: str, allowed: tuple[str, ...], layout: str) -> None:
    """Refuse a folder whose config.json describes another kind of model (before a library misreads it)."""
    import json

    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise UserError(f"{key}: '{folder / 'config.json'}' is not readable JSON ({err}): expected {layout}") from err
    if model_type not in allowed:
        raise UserError(f"{key}: '{folder / 'config.json'}' describes a {model_type!r} model, not "
                        f"{' or '.join(map(repr, allowed))}: expected {layout}")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' load report lists every unused weight (a full CLIPModel's vision tower, a T5 decoder, MiniLM's
    pooler): one line each, on every load. Missing weights are checked by the callers instead."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" for a model that loads in a second
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(cls: Any, folder: Path, key: str) -> torch.nn.Module:
    """`cls` (a transformers model class) from `folder` in float32: safetensors via `from_pretrained`, a `.bin`
    weights-only into `cls(config)`; missing weights are a `UserError`, unused ones (a full CLIPModel's vision tower,
    a T5 decoder) are dropped without a report."""
    if any((folder / name).is_file() for name in SAFETENSORS):
        try:
            with quiet_transformers():
                model, info = cls.from_pretrained(str(folder), use_safetensors=True, dtype=torch.float32,
                                                  output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"{key}: '{folder}' could not be loaded as {cls.__name__} "
                            f"({str(err).splitlines()[0]})") from err
        missing = sorted(info.get("missing_keys") or [])
        if missing:  # transformers would start them at random: a silently untrained encoder
            raise UserError(f"{key}: '{folder}' lacks {len(missing)} weights of {cls.__name__} (first: {missing[0]}): "
                            "the weights do not match its config.json")
        return model.eval()
    config = cls.config_class.from_pretrained(str(folder))
    model = cls(config)
    state = load_checkpoint(folder / PICKLE, what=f"{cls.__name__} weights", key=key)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    found = {name: _find(state, name) for name in own}
    missing = [name for name, value in found.items() if value is None]
    if missing:
        raise UserError(f"{key}: '{folder / PICKLE}' lacks {len(missing)} weights of {cls.__name__} (first: "
                        f"{missing[0]}): the file does not match its config.json")
    model.load_state_dict(found, strict=True)
    return model.float().eval()


def _find(state: dict[str, Any], name: str) -> Any:
    """A weight under the names older files use: with or without the `text_model.` prefix (transformers < 5, a
    full CLIPModel), and T5's token embedding saved once as `shared.weight`."""
    aliases = (name, f"text_model.{name}", name.removeprefix("text_model."))
    if name == "encoder.embed_tokens.weight":
        aliases += ("shared.weight",)
    return next((state[alias] for alias in aliases if alias in state), None)
