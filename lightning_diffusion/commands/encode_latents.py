"""`encode-latents`: image shards -> shards of frozen autoencoder latents, so the denoiser skips the encoder.

`--vae` is a VAE-GAN checkpoint or a diffusers `AutoencoderKL` folder (see `autoencoder.frozen_autoencoder`).

Each output sample keeps the input's `__key__` and caption and holds:
- `latent.npy`: float32 `[C, h, w]`, the **unscaled** posterior mean (`--mode`, the default) or a posterior
  sample (`--sample`, seeded per key so the result does not depend on batch size or device). Unscaled, as LDM
  stores them: the denoiser scales `batch["latent"]` with its own VAE's `latent_scale` (and `latent_shift`) at
  training time (`Denoiser.batch_x0`), so the shards stay valid if the scale is re-measured.
- `txt`: the caption; `json`: the VAE's sha256 (`autoencoder_sha256`), its `latent_scale` and `latent_shift`, the
  posterior choice, the image size, and the input's integer `label` when it had one.
- `text_emb.npy` and `text_pooled.npy` (with `--text-encoder CLIP_CKPT`, or a pretrained encoder chosen by
  `--text-encoder-kind` open_clip / hf_clip / t5 / minilm, see `lightning_diffusion.text_encoders`): float16
  `[L, D]` per-token states and `[P]` pooled vector of the frozen text encoder, with the number of real tokens as
  `text_tokens` in the json. A text denoiser with the same encoder reads them instead of running it
  (`data.tensor_keys: [latent.npy, text_emb.npy, text_pooled.npy]`); the manifest records the encoder's kind and
  fingerprint (a file's sha256, a hash of a folder's files) so it can check that before training.

Input is read through `ShardDataModule`'s unshuffled validation stream, one sample per item so nothing is
dropped for batching; a corrupt input sample is skipped (the stream then repeats an earlier sample, which is
recognised by its key and not written twice). Output shards come from the project's deterministic
`ShardWriter`; `manifest.json` (written last, the "done" marker) lists them with the encoding settings, and
keeps other prefixes' shards, so `--prefix train` and `--prefix val` runs share one folder. Read them with
`data.image_keys: []` and `data.tensor_keys: [latent.npy]`.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_diffusion.arguments import check_output_dir, device_name, nonnegative_int, positive_int
from lightning_diffusion.errors import UserError
from lightning_diffusion.text_encoders.spec import KINDS as TEXT_KINDS, TextEncoderSpec

CREATED_BY = "python -m lightning_diffusion encode-latents"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", required=True,
                        help="VAE-GAN checkpoint (a vae_gan stage's .ckpt) or diffusers AutoencoderKL folder")
    parser.add_argument("--text-encoder", default=None,
                        help="also store a text encoder's per-token states and pooled vector (text_emb.npy, "
                             "text_pooled.npy): a CLIP checkpoint, or the file/folder of --text-encoder-kind")
    parser.add_argument("--text-encoder-kind", default=None, choices=list(TEXT_KINDS),
                        help="what --text-encoder is (default clip; minilm needs no path), as model.text_encoder")
    parser.add_argument("--text-encoder-arch", default=None,
                        help="open_clip architecture of an open_clip weights file (e.g. ViT-L-14)")
    parser.add_argument("--text-layer", default="last", choices=["last", "penultimate"],
                        help="hf_clip states: last layer (default; SD 1.x and SD 2.x folders) or "
                             "penultimate (diffusers' clip_skip=1)")
    parser.add_argument("--in", dest="urls", required=True, nargs="+",
                        help="input image shards (patterns like 'data/emoji/train-*.tar')")
    parser.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    parser.add_argument("--prefix", default="train", help="shard name prefix and split name (default train)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="encode at N px (default: the VAE's image_size / sample_size; must match the denoiser's)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder forward (default 64)")
    posterior = parser.add_mutually_exclusive_group()
    posterior.add_argument("--mode", dest="posterior", action="store_const", const="mode",
                           help="store the posterior mean (default)")
    posterior.add_argument("--sample", dest="posterior", action="store_const", const="sample",
                           help="store one posterior sample per image (seeded by --seed and the key)")
    parser.set_defaults(posterior="mode")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of --sample")
    parser.add_argument("--num-workers", type=nonnegative_int, default=1, help="decoding workers (default 1)")
    parser.add_argument("--max-samples-per-shard", type=positive_int, default=1000, help="default 1000")
    parser.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, ... (default: cuda when available)")


def npy_bytes(array: np.ndarray) -> bytes:
    """`.npy` bytes (no pickle), as `data_pipelines.decoding.load_tensor` reads them."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def sample_noise(shape: tuple[int, ...], seed: int, key: str) -> torch.Tensor:
    """Standard normal noise for one sample, a function of (seed, key) only."""
    from data_pipelines.epoch_plan import derive_seed

    generator = torch.Generator().manual_seed(derive_seed("encode-latents", seed, key) % 2**63)
    return torch.randn(shape, generator=generator)


def _single_samples(urls: list[str], image_size: int, num_workers: int) -> tuple[Iterator[dict[str, Any]], Any]:
    """Every input sample once, in shard order, as one-sample batches (and the DataModule, for skip counts)."""
    from data_pipelines.datamodule import ShardDataModule

    data = ShardDataModule(train_urls=urls, val_urls=urls, image_size=image_size, batch_size=1, num_workers=num_workers,
                           shuffle_buffer=0, persistent_workers=False)
    data.setup("validate")
    return iter(data.val_dataloader()), data


def _batches(samples: Iterator[dict[str, Any]], batch_size: int, seen: set[str]) -> Iterator[dict[str, Any]]:
    """Group one-sample batches into batches, dropping repeated keys (the stream's replacements of bad samples)."""
    pending: list[dict[str, Any]] = []
    for sample in samples:
        key = sample["key"][0]
        if key in seen:
            continue
        seen.add(key)
        pending.append(sample)
        if len(pending) == batch_size:
            yield _stack(pending)
            pending = []
    if pending:
        yield _stack(pending)


def _stack(samples: list[dict[str, Any]]) -> dict[str, Any]:
    labels = [int(s["label"][0]) if "label" in s else None for s in samples]
    return {"image": torch.cat([s["image"] for s in samples]), "caption": [s["caption"][0] for s in samples],
            "key": [s["key"][0] for s in samples], "label": labels}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def encode_batch(vae: Any, images: torch.Tensor, keys: list[str], posterior: str, seed: int) -> torch.Tensor:
    """Unscaled latents of a batch: the posterior mean, or `mean + std * eps` with per-key noise."""
    q = vae.encode(images)
    if posterior == "mode":
        return q.mode().float()
    noise = torch.stack([sample_noise(tuple(q.mean.shape[1:]), seed, key) for key in keys]).to(q.mean)
    return (q.mean + q.std * noise).float()


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from data_pipelines.shard_writer import (
        ShardWriter, read_manifest, remove_stale_shards, write_manifest,
    )
    from data_pipelines.urls import resolve_shards
    from lightning_diffusion.autoencoder.frozen_autoencoder import autoencoder_sha256, load_frozen_autoencoder

    urls = resolve_shards(args.urls, "--in")
    out = check_output_dir(args.out, "--out")
    if not re.match(r"^[A-Za-z0-9_\-]+$", args.prefix):
        raise UserError(f"--prefix {args.prefix!r} may only use letters, digits, '_' and '-', e.g. --prefix train")
    if any(Path(url).resolve().parent == out.resolve() for url in urls):
        raise UserError(f"--out {out} is the folder of the input shards: write the latents to a folder of their own")
    device = _device(args.device)
    vae = load_frozen_autoencoder(args.vae, "--vae").to(device)
    image_size = args.image_size or vae.default_image_size
    factor = vae.downsampling_factor
    if image_size < 1 or image_size % factor:
        raise UserError(f"--image-size {image_size} must be a positive multiple of the VAE's downsampling "
                        f"factor {factor}")
    text_spec = text_encoder = None
    if args.text_encoder or args.text_encoder_kind:
        text_spec = TextEncoderSpec(args.text_encoder_kind or "clip", args.text_encoder, args.text_encoder_arch,
                                    args.text_layer, key="--text-encoder")
        text_encoder = text_spec.load().to(device)
    vae_sha = autoencoder_sha256(args.vae)
    latent_scale = float(vae.latent_scale)
    meta_common = {"vae_sha256": vae_sha, "latent_scale": latent_scale, "latent_shift": float(vae.latent_shift),
                   "posterior": args.posterior, "image_size": image_size}

    previous = read_manifest(out) if out.exists() else None
    samples, data = _single_samples(urls, image_size, args.num_workers)
    seen: set[str] = set()
    latent_shape: list[int] | None = None
    writer = ShardWriter(out, args.prefix, max_samples=args.max_samples_per_shard)
    with writer, torch.no_grad(), tqdm(desc=f"encode-latents {args.prefix}", unit="img", file=sys.stderr,
                                       mininterval=2.0) as progress:
        for batch in _batches(samples, args.batch_size, seen):
            images = batch["image"].to(device)
            latents = encode_batch(vae, images, batch["key"], args.posterior, args.seed).cpu().numpy()
            latent_shape = list(latents.shape[1:])
            states = pooled = lengths = None
            if text_encoder is not None:
                tokens = text_encoder.tokenizer(batch["caption"]).to(device)
                states, pooled = (part.half().cpu().numpy() for part in text_encoder(tokens))
                lengths = text_encoder.token_mask(tokens).sum(1).tolist()
            for i, key in enumerate(batch["key"]):
                meta = dict(meta_common)
                if batch["label"][i] is not None:
                    meta["label"] = batch["label"][i]
                entries = {"latent.npy": npy_bytes(latents[i]), "txt": batch["caption"][i].encode()}
                if states is not None:
                    entries["text_emb.npy"] = npy_bytes(states[i])
                    entries["text_pooled.npy"] = npy_bytes(pooled[i])
                    meta["text_tokens"] = int(lengths[i])
                entries["json"] = json.dumps(meta, sort_keys=True).encode()
                writer.write(key, entries)
            progress.update(len(batch["key"]))
    if not seen:
        raise UserError(f"no readable samples in --in {' '.join(args.urls)}: check the shards")
    remove_stale_shards(out, args.prefix, {s.name for s in writer.shards})
    kept = [s for s in (previous or {}).get("shards", [])
            if s.get("split") != args.prefix and not s["name"].startswith(f"{args.prefix}-") and (out / s["name"]).exists()]
    shards = sorted(kept + [asdict(s) for s in writer.shards], key=lambda s: s["name"])
    counts: dict[str, dict[str, int]] = {}
    for shard in shards:
        counts.setdefault(shard["split"], {"total": 0})["total"] += shard["count"]
    options = {k: v for k, v in ((previous or {}).get("options") or {}).items() if k != args.prefix and isinstance(v, dict)}
    options[args.prefix] = {
        "inputs": urls, "vae_checkpoint": str(args.vae), **meta_common, "latent_shape": latent_shape,
        "seed": args.seed if args.posterior == "sample" else None,
        "text_encoder_checkpoint": args.text_encoder, "text_encoder_kind": text_spec.kind if text_spec else None,
        "text_encoder_sha256": text_spec.fingerprint() if text_spec else None,
        "text_encoder_arch": text_spec.arch if text_spec else None,
        "text_layer": text_spec.layer if text_spec else None,
        "skipped_samples": int(sum(data.skipped_samples.values())),
    }
    write_manifest(out, {"dataset": out.name, "created_by": CREATED_BY, "image_size": image_size,
                         "tensor_keys": ["latent.npy"] + (["text_emb.npy", "text_pooled.npy"] if text_encoder is not None else []),
                         "options": options, "counts": counts, "shards": shards})
    print(f"wrote {len(seen)} latents {latent_shape} ({args.posterior}, unscaled; latent_scale {latent_scale:.4g}) "
          f"in {len(writer.shards)} shards to {out}; skipped {options[args.prefix]['skipped_samples']} unreadable",
          file=sys.stderr)
    return 0
