"""Pre-encoded inputs of the denoiser (`encode-latents` shards): the check that they came from this model's frozen
encoders, and the text condition read from them instead of running the text tower.

`encode-latents` records in its `manifest.json`, per split, the sha256 of the VAE-GAN checkpoint, or of a diffusers
AutoencoderKL folder's config.json + weights (`autoencoder_sha256`), the kind and fingerprint of the text encoder
that wrote `text_emb.npy`/`text_pooled.npy` (a CLIP checkpoint's sha256, or a hash of a pretrained encoder's files,
see `text_encoders.spec`), and the latent shape. Latents of another VAE would train the denoiser in a space its
decoder does not read, silently; so before the first step every shard folder's record is compared with the files
the denoiser's `model.vae_checkpoint` and text encoder arguments name.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_diffusion.errors import UserError
from lightning_diffusion.text_encoders.spec import TextEncoderSpec

LATENT_ENTRY, TEXT_ENTRIES = "latent.npy", ("text_emb.npy", "text_pooled.npy")


def encoding_records(urls: Sequence[str]) -> dict[str, dict[str, Any] | None]:
    """Shard folder -> the encode-latents options of the split its shards belong to (None: no record)."""
    records: dict[str, dict[str, Any] | None] = {}
    for url in urls:
        path = Path(url)
        folder = str(path.parent)
        manifest_path = path.parent / "manifest.json"
        if folder in records or not manifest_path.is_file():
            records.setdefault(folder, None)
            continue
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exn:
            raise UserError(f"{manifest_path} is not readable JSON ({exn}): re-run encode-latents") from exn
        split = next((s.get("split") for s in manifest.get("shards", []) if s.get("name") == path.name), None)
        records[folder] = (manifest.get("options") or {}).get(split)
    return records


def text_encoder_flags(spec: TextEncoderSpec) -> str:
    """The `encode-latents` options that select `spec`'s encoder."""
    flags = f"--text-encoder {spec.path}" if spec.path else ""
    if spec.kind != "clip":
        flags += f" --text-encoder-kind {spec.kind}"
    if spec.arch:
        flags += f" --text-encoder-arch {spec.arch}"
    if spec.layer != "last":
        flags += f" --text-layer {spec.layer}"
    return flags.strip()


def check_pre_encoded(urls: Sequence[str], tensor_keys: Sequence[str], *, latent_shape: Sequence[int] | None,
                      vae_checkpoint: str | None, text_encoder: TextEncoderSpec | None,
                      sha256: Callable[[Path], str]) -> None:
    """Refuse shards whose latents or text states were made by other encoders than the denoiser's (see module doc).

    ``latent_shape`` is the denoiser's ``(C, h, w)`` for a latent model (None for a pixel model); ``text_encoder``
    the spec of a text model's encoder, else None. Folders without a record are trusted with a warning.
    """
    keys = set(tensor_keys)
    uses_latents, uses_text = LATENT_ENTRY in keys, bool(keys & set(TEXT_ENTRIES))
    if not (uses_latents or uses_text):
        return
    if uses_latents and latent_shape is None:
        raise UserError("data.tensor_keys has latent.npy but model.space is pixel: set model.space: latent "
                        "(with model.vae_checkpoint) or read the image shards instead")
    if uses_text:
        if text_encoder is None:
            raise UserError("data.tensor_keys has stored text embeddings, which come from a CLIP text tower or "
                            "another text encoder: set model.conditioning to a text kind, or drop "
                            f"{'/'.join(TEXT_ENTRIES)} from data.tensor_keys")
        if not keys >= set(TEXT_ENTRIES):
            raise UserError(f"data.tensor_keys must name both {' and '.join(TEXT_ENTRIES)} (the per-token states "
                            "and the pooled embedding) or neither")
    hashes: dict[str, str] = {}
    text_fingerprint = functools.cache(text_encoder.fingerprint) if uses_text else None

    def digest(path: str) -> str:
        if path not in hashes:
            hashes[path] = sha256(Path(path))
        return hashes[path]

    for folder, record in encoding_records(urls).items():
        if record is None:
            warnings.warn(f"{folder} has no encode-latents record in manifest.json: cannot check that its "
                          "pre-encoded entries come from this denoiser's VAE-GAN / text encoder", stacklevel=2)
            continue
        fix = f"re-run python -m lightning_diffusion encode-latents into {folder}"
        if uses_latents:
            if vae_checkpoint and record.get("vae_sha256") != digest(vae_checkpoint):
                raise UserError(f"the latents in {folder} were encoded with another autoencoder "
                                f"({record.get('vae_checkpoint')}) than model.vae_checkpoint {vae_checkpoint}: "
                                f"{fix} --vae {vae_checkpoint}, or point model.vae_checkpoint at that autoencoder")
            if record.get("latent_shape") not in (None, list(latent_shape)):
                raise UserError(f"the latents in {folder} are {record['latent_shape']}, this denoiser's are "
                                f"{list(latent_shape)}: set model.image_size to the encoded image size "
                                f"({record.get('image_size')}) or {fix} --image-size <model.image_size>")
        if uses_text:
            flags = text_encoder_flags(text_encoder)
            if not record.get("text_encoder_sha256"):
                raise UserError(f"{folder} holds no stored text embeddings: {fix} {flags}, or drop "
                                f"{'/'.join(TEXT_ENTRIES)} from data.tensor_keys")
            stored_kind = record.get("text_encoder_kind", "clip")
            if stored_kind != text_encoder.kind or record["text_encoder_sha256"] != text_fingerprint():
                what = "CLIP" if stored_kind == text_encoder.kind == "clip" else "text encoder"
                layer = f", {record['text_layer']} layer" if stored_kind == "hf_clip" and record.get("text_layer") else ""
                raise UserError(f"the text embeddings in {folder} come from another {what} ({stored_kind} "
                                f"{record.get('text_encoder_checkpoint')}{layer}) than this denoiser's "
                                f"({text_encoder.describe()}): {fix} {flags}, or drop "
                                f"{'/'.join(TEXT_ENTRIES)} from data.tensor_keys")


def stored_text_states(batch: dict[str, Any], width: int, pooled_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(states [B, L, width], pooled [B, pooled_dim])`` of a batch's stored text embeddings, as float32."""
    if "text_pooled" not in batch:
        raise UserError("the batches carry text_emb but no text_pooled: add text_pooled.npy to data.tensor_keys")
    states, pooled = batch["text_emb"], batch["text_pooled"]
    if states.ndim != 3 or states.shape[-1] != width or pooled.ndim != 2 or pooled.shape[-1] != pooled_dim:
        raise UserError(f"stored text embeddings are {tuple(states.shape)} and {tuple(pooled.shape)}; this "
                        f"denoiser's text encoder gives [B, L, {width}] and [B, {pooled_dim}]: re-run encode-latents "
                        "--text-encoder with this denoiser's text encoder")
    return states.to(device, torch.float32), pooled.to(device, torch.float32)


def check_stored_tokens(stored: tuple[Tensor, Tensor] | None, tokens: Tensor) -> None:
    """Stored states must have one row per token of the denoiser's tokenizer (same context length)."""
    if stored is not None and stored[0].shape[:2] != tokens.shape:
        raise UserError(f"stored text embeddings hold {stored[0].shape[1]} tokens, the tokenizer gives "
                        f"{tokens.shape[1]}: re-run encode-latents --text-encoder with this denoiser's text encoder")
