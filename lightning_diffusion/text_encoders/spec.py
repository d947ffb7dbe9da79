"""Which frozen text encoder a denoiser uses, from its plain arguments, and a fingerprint of its files.

The fingerprint is what `encode-latents` records next to stored text states and what the denoiser compares
before training on them: the sha256 of the CLIP checkpoint (kind `clip`, as before), else a sha256 over the kind,
architecture, layer and the sha256 of every file of the model and tokenizer folders (or of the weights file).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from torch import nn

from lightning_diffusion.errors import UserError

TextEncoderName = Literal["clip", "minilm", "open_clip", "hf_clip", "t5"]
TextLayer = Literal["last", "penultimate"]
KINDS: tuple[str, ...] = ("clip", "minilm", "open_clip", "hf_clip", "t5")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TextEncoderSpec:
    """`kind` (see `TextEncoderName`), `path` (CLIP checkpoint, weights file or folder; None: MiniLM's default
    folder), `arch` (open_clip architecture of a weights file) and `layer` (`hf_clip` states: last or penultimate);
    `key` names the argument `path` came from, for messages."""

    kind: str
    path: str | None = None
    arch: str | None = None
    layer: str = "last"
    key: str = "model.text_encoder_path"

    @classmethod
    def from_hparams(cls, hp: Mapping[str, Any]) -> "TextEncoderSpec":
        """The spec of a Denoiser's hyper-parameters; a `clip` encoder reads `clip_checkpoint` unless
        `text_encoder_path` is set."""
        kind, path = hp["text_encoder"], hp.get("text_encoder_path")
        key = "model.text_encoder_path"
        if kind == "clip" and not path:
            path, key = hp.get("clip_checkpoint"), "model.clip_checkpoint"
        return cls(kind, path, hp.get("text_encoder_arch"), hp.get("text_layer") or "last", key)

    def check(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"unknown model.text_encoder {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.layer not in ("last", "penultimate"):
            raise UserError(f"model.text_layer must be 'last' or 'penultimate', got {self.layer!r}")
        if self.layer == "penultimate" and self.kind != "hf_clip":
            raise UserError("model.text_layer: penultimate is for model.text_encoder: hf_clip (diffusers' clip_skip=1); "
                            "set it to last for other encoders")

    def load(self) -> nn.Module:
        """The encoder (eval mode, no gradients); a `UserError` naming the file or folder when it is wrong."""
        self.check()
        if self.kind == "clip":
            from lightning_diffusion.clip import CLIPTextEncoder
            from lightning_diffusion.diffusion.frozen import CLIP_FIX

            if not self.path:
                raise UserError(f"{self.key} is not set: this denoiser needs the frozen CLIP text tower; {CLIP_FIX}")
            if not Path(self.path).is_file():
                raise UserError(f"{self.key} '{self.path}' does not exist: {CLIP_FIX}")
            return CLIPTextEncoder.from_checkpoint(self.path)
        if self.kind == "minilm":
            from lightning_diffusion.clip import MiniLMTextEncoder

            encoder = MiniLMTextEncoder(self.path)
        elif self.kind == "open_clip":
            from lightning_diffusion.text_encoders.open_clip_text import OpenCLIPTextEncoder

            encoder = OpenCLIPTextEncoder(self.path, self.arch, self.key)
        elif self.kind == "hf_clip":
            from lightning_diffusion.text_encoders.hf_clip import HFCLIPTextEncoder

            encoder = HFCLIPTextEncoder(self.path, self.layer, self.key)
        else:
            from lightning_diffusion.text_encoders.t5 import T5TextEncoder

            encoder = T5TextEncoder(self.path, key=self.key)
        return encoder.eval().requires_grad_(False)

    def files(self) -> list[Path]:
        """The files that determine the encoder's outputs (weights, configs, tokenizer)."""
        if self.kind == "minilm":
            from lightning_diffusion.clip.towers import minilm_dir

            folders = [minilm_dir(self.path)]
        elif self.kind in ("hf_clip", "t5"):
            from lightning_diffusion.text_encoders.hf_folder import model_folders

            folders = list(dict.fromkeys(model_folders(self.path, self.key, "a model folder")))
        elif self.path and Path(self.path).is_dir():
            folders = [Path(self.path)]
        else:
            return [Path(self.path)] if self.path else []
        return sorted(f for folder in folders for f in folder.iterdir() if f.is_file())

    def fingerprint(self) -> str:
        """See the module doc."""
        if self.kind == "clip":
            return _sha256(Path(self.path))
        files = {f"{f.parent.name}/{f.name}": _sha256(f) for f in self.files()}
        record = {"kind": self.kind, "arch": self.arch, "layer": self.layer, "files": files}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        extra = f", {self.arch}" if self.arch else ""
        layer = f", {self.layer} layer" if self.kind == "hf_clip" else ""
        return f"{self.kind} {self.path or '(default)'}{extra}{layer}"


def text_dims(encoder: Any) -> tuple[int | None, int | None]:
    """(state width, pooled size) of a `Frozen` text encoder (None, None without one), from a probe forward."""
    if encoder is None:
        return None, None
    states, pooled = encoder.module(encoder.module.tokenizer([""]))
    return int(states.shape[-1]), int(pooled.shape[-1])
