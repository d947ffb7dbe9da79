"""Fuzzing shard bytes (hypothesis): cuts, byte flips (some with the header checksum repaired, so the damage gets
past it into the size, name and type fields), junk and zeroed blocks in a small valid shard.

Properties: our tar reader yields exactly the samples webdataset's tarfile-based reader yields before either
stops; the DataModule never raises anything but our UserError (no readable samples), never hangs, and yields
exactly `len(loader)` well-formed batches. The 200 examples each are fixed (derandomized) so CI is repeatable;
`FUZZ_EXAMPLES=3000` draws that many fresh ones (about a minute).
"""

from __future__ import annotations

import functools
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipelines.tar_members import BLOCK, is_plain_tar, local_tar_files
from lightning_diffusion.errors import UserError
from malformed_support import SIZE, encode, one_epoch, write_tar

pytestmark = pytest.mark.timeout(240)
LONG_KEY = "nested/" + "k" * 120  # a PAX path record: its payload is not covered by any checksum
KEYS = [f"f{index}" for index in range(4)] + [LONG_KEY]
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 200)), deadline=None, database=None,
                derandomize=not os.environ.get("FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _sample(index: int, key: str) -> dict:
    pixels = np.random.default_rng(index).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    return {"__key__": key, "png": encode(Image.fromarray(pixels)), "txt": f"caption {index}", "json": {"label": index}}


@functools.cache
def valid_shard() -> tuple[bytes, tuple[int, ...]]:
    """The shard's bytes and the offsets of its headers."""
    with tempfile.TemporaryDirectory() as directory:
        path = write_tar(Path(directory) / "base.tar", [_sample(index, key) for index, key in enumerate(KEYS)])
        data = path.read_bytes()
        with tarfile.open(path) as archive:
            members = archive.getmembers()
    headers = sorted({member.offset for member in members} | {member.offset_data - BLOCK for member in members})
    return data, tuple(headers)


def _repair_checksum(data: bytearray, header: int) -> None:
    block = data[header : header + BLOCK]
    if len(block) == BLOCK:
        block[148:156] = b" " * 8
        data[header + 148 : header + 156] = f"{sum(block):06o}\0 ".encode()


@st.composite
def corrupted(draw) -> bytes:
    data, headers = valid_shard()
    data = bytearray(data)
    # Damage to the first header sends the shard to webdataset's reader; hit the later ones more often.
    in_header = st.builds(lambda h, i: h + i, st.sampled_from(headers[1:]), st.integers(0, BLOCK - 1))
    position = st.one_of(in_header, st.integers(0, len(data) - 1))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cut", "flip", "flip_and_repair", "junk", "zero_block"]))
        if not data:
            break
        at = min(draw(position), len(data) - 1)
        if kind == "cut":
            del data[at:]
        elif kind in ("flip", "flip_and_repair"):
            data[at] ^= draw(st.integers(1, 255))
            if kind == "flip_and_repair":
                _repair_checksum(data, at // BLOCK * BLOCK)
        elif kind == "junk":
            junk = draw(st.binary(min_size=1, max_size=64))
            data[at : at + len(junk)] = junk
        else:
            start = at // BLOCK * BLOCK
            data[start : start + BLOCK] = bytes(min(BLOCK, len(data) - start))
    return bytes(data)


def _until_error(samples) -> list[dict]:
    out = []
    try:
        for sample in samples:
            out.append(sample)
    except Exception:  # both readers raise at damage; what came before is compared
        pass
    return out


@FUZZ
@given(shard=corrupted())
def test_our_tar_reader_yields_what_webdataset_yields(shard):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.tar"
        path.write_bytes(shard)
        if not is_plain_tar(str(path)):
            return  # such shards are read by webdataset itself
        ours = _until_error(group_by_keys(local_tar_files(str(path))))
        event(f"{len(ours)} of {len(KEYS)} samples read")
        with open(path, "rb") as stream:
            theirs = _until_error(group_by_keys(tar_file_expander(iter([{"url": str(path), "stream": stream}]))))
    assert ours == theirs


@FUZZ
@given(shard=corrupted(), batch_size=st.sampled_from([1, 2, 3]))
def test_datamodule_survives_any_shard_bytes(shard, batch_size):
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "x-0.tar").write_bytes(shard)
        write_tar(Path(directory) / "x-1.tar", [_sample(index, f"good{index}") for index in range(2)])
        try:
            batches, dm, _, _ = one_epoch(str(Path(directory) / "x-*.tar"), batch_size=batch_size, shuffle_buffer=3)
        except UserError:
            event("UserError: too few readable samples")
            return
        event(f"{dm.skipped_samples['train']} skipped")
        expected_batches = len(dm.train_dataloader())
    assert len(batches) == expected_batches
    known = set(KEYS) | {"good0", "good1"}
    for batch in batches:
        assert set(batch) <= {"image", "caption", "key", "label"}
        assert batch["image"].shape == (batch_size, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
        assert torch.isfinite(batch["image"]).all() and batch["image"].abs().max() <= 1
        assert len(batch["caption"]) == len(batch["key"]) == batch_size
        assert all(isinstance(caption, str) for caption in batch["caption"]) and set(batch["key"]) <= known
        if "label" in batch:
            assert batch["label"].dtype == torch.int64 and batch["label"].shape == (batch_size,)
    assert dm.skipped_samples["train"] >= 0



def _compare_readers(shard: bytes, prefix: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "crafted.tar"
        path.write_bytes(shard)
        assert is_plain_tar(str(path))
        ours = _until_error(group_by_keys(local_tar_files(str(path))))
        with open(path, "rb") as stream:
            theirs = _until_error(group_by_keys(tar_file_expander(iter([{"url": str(path), "stream": stream}]))))
    assert ours == (theirs[: len(ours)] if prefix else theirs)
    return ours


@pytest.mark.parametrize("kind", [b"5", b"2", b"1", b"V", b"g", b"X", b"S", b"slash"])
def test_crafted_member_types_read_as_tarfile_reads_them(kind):
    """Type flags a shard writer never uses, with valid checksums: directories and links carry no data for
    tarfile (what follows is read as the next header), `g` applies its PAX records to every later member. GNU
    sparse members (`S`) end our reader (it does not rebuild sparse files): the samples before agree."""
    data, headers = valid_shard()
    data = bytearray(data)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "base.tar"
        path.write_bytes(bytes(data))
        with tarfile.open(path) as archive:
            member = archive.getmember("f1.png")
    header = member.offset_data - BLOCK if kind not in (b"g", b"X") else member.offset  # ustar or its PAX header
    if kind == b"slash":
        data[header + 6] = ord("/")  # "f1.png" -> "f1.png/": an old-style directory when the type is NUL
        data[header + 156] = 0
    else:
        data[header + 156] = kind[0]
    _repair_checksum(data, header)
    samples = _compare_readers(bytes(data), prefix=kind == b"S")
    assert samples[0]["__key__"] == "f0"  # the damage comes after f0

