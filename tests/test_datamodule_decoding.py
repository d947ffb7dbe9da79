"""Sample decoding: every PIL mode to RGB (transparency on white, 16-bit rescaled), resize + centre crop against
torchvision, the [-1, 1] batch range, limits, EXIF orientation and safe tensor loading."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from data_pipelines.decoding import Collate, CorruptSample, SampleDecoder, decode_image, load_tensor, to_rgb


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_modes_become_rgb_with_transparency_on_white():
    grey = Image.fromarray(np.full((4, 4), 77, np.uint8))
    assert np.array_equal(np.asarray(to_rgb(grey)), np.full((4, 4, 3), 77, np.uint8))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 10, 20, 255)  # opaque
    rgba[0, 1] = (0, 0, 0, 0)  # transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half black on white
    flat = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).astype(int)
    assert tuple(flat[0, 0]) == (200, 10, 20) and tuple(flat[0, 1]) == (255, 255, 255)
    assert np.all(np.abs(flat[1, 0] - 127) <= 1)
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.info["transparency"] = 1
    decoded = np.asarray(to_rgb(Image.open(io.BytesIO(encode(palette)))))
    assert tuple(decoded[0, 0]) == (10, 20, 30) and tuple(decoded[0, 1]) == (255, 255, 255)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert tuple(np.asarray(to_rgb(cmyk))[0, 0]) == (255, 0, 0)
    la = Image.fromarray(np.array([[[0, 0]]], np.uint8), "LA")
    assert tuple(np.asarray(to_rgb(la))[0, 0]) == (255, 255, 255)


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535]], np.uint16)
    image = Image.open(io.BytesIO(encode(Image.fromarray(values))))
    assert image.mode.startswith("I")
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 128, 255]


def test_resize_and_centre_crop_match_torchvision():
    y, x = np.mgrid[0:60, 0:100]
    smooth = np.stack([x * 2.5, y * 4.0, (x + y) * 1.5], axis=-1).clip(0, 255).astype(np.uint8)
    ours = decode_image(encode(Image.fromarray(smooth)), 24)
    reference = v2.Compose([v2.Resize(24, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(24)])
    theirs = np.asarray(reference(Image.fromarray(smooth)))
    assert ours.shape == (24, 24, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 2.0  # sub-pixel rounding of size and offset only
    small = decode_image(encode(Image.fromarray(smooth[:10, :10])), 24)  # upscaling works too
    assert small.shape == (24, 24, 3)


def test_jpeg_draft_decoding_and_exif_orientation():
    y, x = np.mgrid[0:128, 0:256]
    pixels = np.stack([x, y * 2, 255 - x], axis=-1).clip(0, 255).astype(np.uint8)
    full = decode_image(encode(Image.fromarray(pixels)), 16)
    drafted = decode_image(encode(Image.fromarray(pixels), "JPEG", quality=95), 16)
    assert np.abs(full.astype(int) - drafted.astype(int)).mean() < 4.0
    tall = Image.fromarray(pixels[:, :128])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    rotated = decode_image(encode(tall.rotate(90, expand=True), "JPEG", quality=95, exif=exif), 16)
    assert np.abs(rotated.astype(int) - decode_image(encode(tall, "JPEG", quality=95), 16).astype(int)).mean() < 6.0


def test_limits_and_bad_entries_raise_corrupt_sample():
    png = encode(Image.new("RGB", (30, 20)))
    decoder = SampleDecoder(image_size=8, max_image_pixels=500, max_caption_bytes=5)
    with pytest.raises(CorruptSample, match="max_image_pixels"):
        decoder({"__key__": "k", "png": png, "txt": b"ok"})
    decoder = SampleDecoder(image_size=8, max_caption_bytes=5, max_image_bytes=10_000)
    with pytest.raises(CorruptSample, match="max_caption_bytes"):
        decoder({"__key__": "k", "png": png, "txt": b"too long"})
    with pytest.raises(CorruptSample, match="no image entry"):
        decoder({"__key__": "k", "txt": b"ok"})
    assert SampleDecoder(image_size=8, require_caption=False)({"__key__": "k", "png": png})["caption"] == ""
    labelled = SampleDecoder(image_size=8)({"__key__": "k", "jpg": encode(Image.new("RGB", (9, 9)), "JPEG"),
                                             "txt": b" hi \n", "cls": b"4"})
    assert labelled["label"] == 4 and labelled["caption"] == "hi"


def test_collate_scales_to_minus_one_one_and_fills_missing_labels():
    samples = [{"image": np.full((2, 2, 3), value, np.uint8), "caption": "c", "key": str(value), "label": label}
               for value, label in ((0, 2), (255, None))]
    batch = Collate()(samples)
    assert batch["image"].shape == (2, 3, 2, 2) and batch["image"].is_contiguous()
    assert batch["image"][0].eq(-1).all() and batch["image"][1].eq(1).all()
    assert batch["label"].tolist() == [2, -1] and batch["key"] == ["0", "255"]


def test_tensors_load_safely():
    buffer = io.BytesIO()
    np.save(buffer, np.ones((2, 3), np.float16))
    loaded = load_tensor(buffer.getvalue(), "latent.npy")
    assert loaded.dtype == torch.float32 and loaded.shape == (2, 3)
    buffer = io.BytesIO()
    np.save(buffer, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_tensor(buffer.getvalue(), "latent.npy")
    buffer = io.BytesIO()
    torch.save(torch.arange(3), buffer)
    assert load_tensor(buffer.getvalue(), "ids.pth").dtype == torch.int64
    buffer = io.BytesIO()
    torch.save({"not": "a tensor"}, buffer)
    with pytest.raises(CorruptSample):
        load_tensor(buffer.getvalue(), "latent.pth")
