"""Raw webdataset samples (dicts of bytes) -> decoded fields, and decoded samples -> the shared batch dict.

Anything wrong with one sample raises `CorruptSample` (or the decoder's own exception); the stream skips and
counts it. The batch format is the one in docs/conventions.md.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from lightning_diffusion.errors import UserError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# Pillow formats an image entry may hold, whatever its extension says (a .png that is really a JPEG is common).
# Formats without a real magic number (TGA) or with outside interpreters (EPS) would "decode" junk or worse.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
INT64_RANGE = (-(2**63), 2**63 - 1)
TENSOR_EXTENSIONS = ("npy", "pth", "pt")
RESERVED_NAMES = ("image", "caption", "key", "label", "tokens")
# A member whose (key, extension) the sample already holds is renamed `<key>.__duplicate<n>__.<ext>` by the stream
# (webdataset would raise and lose the rest of the shard); the decoder then skips that sample.
DUPLICATE_MARK = "__duplicate"
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
WHITE = (255, 255, 255)


class CorruptSample(ValueError):
    """One sample that cannot be used (bad bytes, missing entry, over a limit); skipped and counted."""


def tensor_name(entry: str) -> str:
    """`latent.npy` -> `latent`: the batch key of a tensor entry."""
    return entry.rsplit(".", 1)[0]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white, 16-bit grey is rescaled, not clipped."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        grey = np.clip((values * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
        if isinstance(image.info.get("transparency"), int):  # a tRNS grey value: transparent, so white
            grey[values == image.info["transparency"]] = 255
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.nan_to_num(values) * scale + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` and keep the centred square, in one antialiased bicubic resample.

    Resampling only the centred square box of the source is the continuous form of torchvision's
    Resize(size) + CenterCrop(size) (which rounds the intermediate size and the crop offset to whole pixels).
    """
    width, height = image.size
    if (width, height) == (size, size):
        return image
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def decode_image(data: bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Image bytes -> uint8 RGB array [size, size, 3]; the pixel limit is checked from the header, before decoding."""
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise CorruptSample(f"image is {image.width}x{image.height}, over data.max_image_pixels={max_pixels}")
        if image.format == "JPEG":
            image.draft("RGB", (size, size))
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
        return np.asarray(resize_center_crop(to_rgb(image), size))


def load_tensor(data: bytes, entry: str) -> torch.Tensor:
    """`.npy` with allow_pickle=False, `.pth`/`.pt` with weights_only=True; floating tensors become float32."""
    extension = entry.rsplit(".", 1)[-1]
    if extension == "npy":
        tensor = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    else:
        tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(tensor, torch.Tensor):
            raise CorruptSample(f"{entry} holds a {type(tensor).__name__}, not a tensor")
    return tensor.float() if tensor.is_floating_point() else tensor


def _label(sample: dict[str, Any], field: str | None = None, classes: tuple[str, ...] = ()) -> int | None:
    if field is not None:
        return _derived_label(sample, field, classes)
    if "json" in sample:
        meta = json.loads(sample["json"])
        label = meta.get("label") if isinstance(meta, dict) else None
        if isinstance(label, int) and not isinstance(label, bool):
            return _int64_label(label)
    if "cls" in sample:
        return _int64_label(int(sample["cls"].decode("utf-8").strip()))
    return None


def _derived_label(sample: dict[str, Any], field: str, classes: tuple[str, ...]) -> int:
    """The index in `classes` of the sample's json metadata entry `field` (e.g. style "3d" -> 0, "flat" -> 1)."""
    meta = json.loads(sample["json"]) if "json" in sample else None
    if not isinstance(meta, dict) or field not in meta:
        raise CorruptSample(f"no json metadata entry {field!r} (data.label_field) to derive the label from")
    value = meta[field]
    if not isinstance(value, str) or value not in classes:
        raise CorruptSample(f"json {field} = {value!r} is not one of data.label_classes {list(classes)}")
    return classes.index(value)


def _int64_label(label: int) -> int:
    if not INT64_RANGE[0] <= label <= INT64_RANGE[1]:
        raise CorruptSample(f"label {label} does not fit in int64")
    return label


@dataclass(frozen=True)
class SampleDecoder:
    """Decodes one raw sample; picklable, so it runs in the DataLoader workers."""

    image_size: int
    image_keys: tuple[str, ...] = IMAGE_EXTENSIONS
    caption_key: str = "txt"
    require_caption: bool = True
    tensor_keys: tuple[str, ...] = ()
    max_image_pixels: int | None = None
    max_image_bytes: int | None = None
    max_caption_bytes: int | None = None
    label_field: str | None = None
    label_classes: tuple[str, ...] = ()

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        duplicates = sorted(key.split("__.", 1)[-1] for key in sample if key.startswith(DUPLICATE_MARK))
        if duplicates:
            raise CorruptSample(f"the shard holds the entry {duplicates[0]!r} of this sample more than once")
        label = _label(sample, self.label_field, self.label_classes)
        out: dict[str, Any] = {"key": sample["__key__"], "label": label}
        if self.image_keys:
            found = next((key for key in self.image_keys if key in sample), None)
            if found is None:
                raise CorruptSample(f"no image entry (looked for {', '.join(self.image_keys)})")
            data = sample[found]
            if self.max_image_bytes is not None and len(data) > self.max_image_bytes:
                raise CorruptSample(f"{found} is {len(data)} bytes, over data.max_image_bytes={self.max_image_bytes}")
            out["image"] = decode_image(data, self.image_size, self.max_image_pixels)
        caption = sample.get(self.caption_key)
        if caption is None:
            if self.require_caption:
                raise CorruptSample(f"no {self.caption_key!r} caption entry")
            caption = b""
        if self.max_caption_bytes is not None and len(caption) > self.max_caption_bytes:
            raise CorruptSample(f"caption is {len(caption)} bytes, over data.max_caption_bytes={self.max_caption_bytes}")
        out["caption"] = caption.decode("utf-8").strip()
        if self.require_caption and not out["caption"]:
            raise CorruptSample(f"the {self.caption_key!r} caption is empty or only whitespace")
        for entry in self.tensor_keys:
            if entry not in sample:
                raise CorruptSample(f"no {entry!r} entry")
            tensor = load_tensor(sample[entry], entry)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CorruptSample(f"{entry} holds non-finite values (NaN or inf)")
            out[tensor_name(entry)] = tensor
        return out


def _stack(name: str, values: Sequence[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(value.shape) for value in values}
    if len(shapes) > 1:
        raise UserError(f"tensor entry {name!r} has different shapes within one batch ({sorted(shapes)}); rewrite the shards")
    return torch.stack(list(values))


@dataclass(frozen=True)
class Collate:
    """Decoded samples -> batch dict; tokenizes captions when a tokenizer is given (in the workers)."""

    tensor_names: tuple[str, ...] = ()
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        if "image" in samples[0]:
            pixels = torch.from_numpy(np.stack([sample["image"] for sample in samples]))
            batch["image"] = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
            batch["image"].div_(127.5).sub_(1.0)
        batch["caption"] = [sample["caption"] for sample in samples]
        batch["key"] = [sample["key"] for sample in samples]
        labels = [sample["label"] for sample in samples]
        if any(label is not None for label in labels):
            batch["label"] = torch.tensor([-1 if label is None else label for label in labels], dtype=torch.int64)
        for name in self.tensor_names:
            batch[name] = _stack(name, [sample[name] for sample in samples])
        if self.tokenizer is not None:
            batch["tokens"] = self._tokens(batch["caption"])
        return batch

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(captions)
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] != len(captions):
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise UserError(
                f"the model's tokenizer returned {shape} for {len(captions)} captions; it must return a "
                "LongTensor [batch, length]"
            )
        return tokens.long()
