"""Pillow helpers used when writing shards: flatten transparency on white, resize, crop, encode PNG.

PNG encoding is deterministic: Pillow writes no timestamp chunk unless asked to, and the zlib level is fixed.
"""

from __future__ import annotations

import io

from PIL import Image

PNG_COMPRESS_LEVEL = 6


def flatten_on_white(image: Image.Image) -> Image.Image:
    """RGB image; transparent pixels (alpha, palette transparency, LA) are composited onto white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Centre a non-square RGB image on a square canvas of the longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size` pixels (Lanczos, which antialiases when shrinking)."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image if new == image.size else image.resize(new, Image.Resampling.LANCZOS)


def center_crop_square(image: Image.Image) -> Image.Image:
    """The largest centred square."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()
