"""Builders for the malformed-data tests: hand-made PNGs (16-bit, tRNS, bombs), shards, and one pass of a DataModule."""

from __future__ import annotations

import io
import struct
import tarfile
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from data_pipelines import ShardDataModule
from data_pipelines.stream import SkippedSampleWarning

SIZE = 8
COLOURS = [(200, 30, 40), (10, 220, 90), (60, 70, 250), (255, 255, 0), (0, 128, 128), (90, 90, 90)]


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: Iterable[bytes], chunks: bytes = b"") -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, 16-bit grey with tRNS or a bomb without the pixels)."""
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(b"\0" + row) for row in rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + chunks + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bomb_png(side: int) -> bytes:
    """A side x side 8-bit grey PNG of zeros: ~side^2 / 1000 bytes on disk, side^2 pixels once decoded."""
    row = bytes(side)
    return raw_png(side, side, 8, 0, (row for _ in range(side)))


def good_sample(index: int, prefix: str = "s") -> dict[str, Any]:
    colour = COLOURS[index % len(COLOURS)]
    return {"__key__": f"{prefix}{index}", "png": encode(Image.new("RGB", (10, 13), colour)), "txt": f"caption {index}"}


def write_tar(path: Path, samples: Iterable[dict[str, Any]]) -> Path:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def member_offsets(path: Path, name: str) -> tuple[int, int]:
    """(header offset, data offset) of a tar member."""
    with tarfile.open(path) as archive:
        member = archive.getmember(name)
    return member.offset, member.offset_data


def one_epoch(urls: str, *, workers: int = 0, batch_size: int = 2, context: str | None = None, **options: Any):
    """(batches, datamodule, skipped-sample warning texts, all warning texts) of one training epoch (unshuffled
    unless `shuffle_buffer` is given)."""
    options = {"shuffle_buffer": 0, "seed": 0, "persistent_workers": False, **options}
    dm = ShardDataModule(urls, image_size=SIZE, batch_size=batch_size, num_workers=workers, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = dm.train_dataloader()
        if context is not None:
            loader.multiprocessing_context = context
        batches = list(loader)
    skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning)]
    return batches, dm, skipped, [str(w.message) for w in caught]
