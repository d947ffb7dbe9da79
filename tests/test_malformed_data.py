"""Malformed shards through the real ShardDataModule (issue 9): each bad sample is skipped, counted in
`skipped_samples` and named (shard + key) in a warning, never a crash or a hang; unusual but valid images
(grey, 1-bit, 16-bit, palette, CMYK, smaller than the target) are converted, not skipped.

tests/test_datamodule.py already covers a png cut short, a plain truncated tar (cut in a payload) and the epoch
metric; tests/test_malformed_fuzz.py fuzzes the shard bytes.
"""

from __future__ import annotations

import io
import re
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from malformed_support import (
    COLOURS, SIZE, bomb_png, encode, good_sample, member_offsets, one_epoch, png_chunk, raw_png, write_tar,
)

pytestmark = pytest.mark.timeout(120)


def pixels(colour) -> torch.Tensor:
    """The batch value of a constant image of `colour` (uint8 -> [-1, 1] exactly as the collate does it)."""
    return torch.tensor(colour, dtype=torch.float32).view(3, 1, 1).div(127.5).sub(1.0).expand(3, SIZE, SIZE)


def assert_good_batches(batches, keys: list[list[str]]) -> None:
    assert [batch["key"] for batch in batches] == keys
    for batch in batches:
        assert batch["image"].shape == (len(batch["key"]), 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
        for key, caption, image in zip(batch["key"], batch["caption"], batch["image"]):
            index = int(key[1:])
            assert caption == f"caption {index}"
            assert torch.allclose(image, pixels(COLOURS[index % len(COLOURS)]), atol=1e-6), key


# ---------------------------------------------------------------- one bad sample among good ones

# A TGA header (no magic number) followed by its pixels: Pillow's TGA plugin would "decode" such junk.
TGA_LOOKALIKE = bytes([0, 0, 2]) + bytes(9) + struct.pack("<HHBB", 2, 2, 24, 0) + bytes(range(12))
HUGE_HEADER = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)) + png_chunk(
    b"IDAT", zlib.compress(bytes(1000))) + png_chunk(b"IEND", b"")

# case -> (entries replaced in sample s2 (None: removed), DataModule options, the reason the warning must give)
BAD_SAMPLES = {
    "non_image_payload": ({"png": b"<html><body>404 Not Found</body></html>\n" * 4}, {}, r"cannot identify image file"),
    "other_format_lookalike": ({"png": TGA_LOOKALIKE}, {}, r"cannot identify image file"),
    "zero_byte_image": ({"png": b""}, {}, r"cannot identify image file"),
    "decompression_bomb": ({"png": bomb_png(7000)}, {}, r"7000x7000, over data.max_image_pixels=40000000"),
    "absurd_header_dimensions": ({"png": HUGE_HEADER}, {}, r"max_image_pixels|decompression bomb"),
    "image_over_byte_limit": ({"png": encode(Image.effect_noise((64, 64), 100))}, {"max_image_bytes": 2000},
                              r"png is \d+ bytes, over data.max_image_bytes=2000"),
    "missing_image": ({"png": None}, {}, r"no image entry"),
    "missing_caption": ({"txt": None}, {}, r"no 'txt' caption entry"),
    "invalid_utf8_caption": ({"txt": b"caf\xe9 cr\xe8me"}, {}, r"UnicodeDecodeError"),
    "100kB_caption": ({"txt": b"word " * 20_000}, {}, r"caption is 100000 bytes, over data.max_caption_bytes=16384"),
    "broken_json": ({"json": b'{"label": 3'}, {}, r"JSONDecodeError"),
    "label_outside_int64": ({"json": b'{"label": 123456789012345678901234567890}'}, {}, r"label"),
    "non_numeric_cls": ({"cls": b"seven"}, {}, r"ValueError"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_a_bad_sample_is_skipped_counted_and_named(tmp_path, case):
    replaced, options, reason = BAD_SAMPLES[case]
    samples = [good_sample(index) for index in range(5)]
    for entry, value in replaced.items():
        if value is None:
            del samples[2][entry]
        else:
            samples[2][entry] = value
    shard = write_tar(tmp_path / "bad-000000.tar", samples)
    batches, dm, skipped, _ = one_epoch(str(shard), **options)
    # 5 samples make 2 batches of 2; the bad one is replaced by the sample after this worker's run.
    assert_good_batches(batches, [["s0", "s1"], ["s3", "s4"]])
    assert dm.skipped_samples == {"train": 1}
    assert len(skipped) == 1 and f"sample 's2' of {shard}" in skipped[0]
    assert re.search(reason, skipped[0]), skipped[0]


def test_a_caption_is_optional_when_not_required(tmp_path):
    samples = [good_sample(index) for index in range(4)]
    del samples[1]["txt"]
    batches, dm, skipped, _ = one_epoch(str(write_tar(tmp_path / "x-0.tar", samples)), require_caption=False)
    assert [b["caption"] for b in batches] == [["caption 0", ""], ["caption 2", "caption 3"]]
    assert dm.skipped_samples == {"train": 0} and not skipped


# ---------------------------------------------------------------- valid images in unusual modes are converted

def _sixteen_bit_grey(values: np.ndarray, transparent: int | None = None) -> bytes:
    chunk = png_chunk(b"tRNS", struct.pack(">H", transparent)) if transparent is not None else b""
    return raw_png(values.shape[1], values.shape[0], 16, 0, (row.astype(">u2").tobytes() for row in values), chunk)


def _rgba_and_palette() -> tuple[bytes, bytes]:
    """The same 8x8 picture as RGBA and as a palette image with per-entry alpha (tRNS)."""
    indices = (np.arange(64).reshape(8, 8) % 4).astype(np.uint8)
    palette = np.array([[200, 0, 0, 255], [0, 200, 0, 128], [0, 0, 200, 0], [40, 50, 60, 30]], np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette[:, :3].flatten().tolist())
    return encode(Image.fromarray(palette[indices], "RGBA")), encode(image, transparency=bytes(palette[:, 3]))


def _converted_cases() -> dict[str, tuple[bytes, np.ndarray, int]]:
    """name -> (image bytes, expected uint8 RGB [SIZE, SIZE, 3] after decoding, tolerance in grey levels)."""
    full = lambda colour: np.broadcast_to(np.array(colour, np.uint8), (SIZE, SIZE, 3))  # noqa: E731
    grey16 = np.full((SIZE, SIZE), 51528)  # 51528 / 257 = 200.498: rescaled to 200 (the high byte would be 201)
    grey16[:4] = 1000
    grey16_expected = np.where(np.arange(SIZE)[:, None, None] < 4, 4, 200).astype(np.uint8) * np.ones(3, np.uint8)
    keyed_expected = grey16_expected.copy()
    keyed_expected[:4] = 255  # the tRNS grey value is transparent: white, as for 8-bit grey with tRNS
    rgba, palette = _rgba_and_palette()
    rgba_flat = np.asarray(Image.open(io.BytesIO(rgba)).convert("RGBA"), np.float64)
    on_white = (rgba_flat[..., :3] * rgba_flat[..., 3:] / 255 + 255 * (1 - rgba_flat[..., 3:] / 255)).round()
    y, x = np.mgrid[0:3, 0:6]  # 6x3 -> 16x8 -> crop 8: no rounding in torchvision's sizes either
    gradient = np.stack([x * 60, y * 100, 255 - x * 50], -1).astype(np.uint8)
    resize = v2.Compose([v2.Resize(SIZE, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(SIZE)])
    rgb16 = np.tile(np.array([51528, 0, 65535]), (SIZE, SIZE, 1))
    return {
        "grey_L": (encode(Image.new("L", (9, 11), 77)), full((77, 77, 77)), 0),
        "grey_jpeg": (encode(Image.new("L", (16, 16), 77), "JPEG", quality=95), full((77, 77, 77)), 1),
        "one_bit": (encode(Image.new("1", (12, 8), 1)), full((255, 255, 255)), 0),
        "grey_16bit": (_sixteen_bit_grey(grey16), grey16_expected, 0),
        "grey_16bit_with_transparent_value": (_sixteen_bit_grey(grey16, transparent=1000), keyed_expected, 0),
        # Pillow reduces 16-bit RGB PNGs to their high bytes: 201 instead of 200 here
        "rgb_16bit": (raw_png(SIZE, SIZE, 16, 2, (row.astype(">u2").tobytes() for row in rgb16)), full((200, 0, 255)), 1),
        "grey_alpha": (encode(Image.new("LA", (SIZE, SIZE), (0, 128))), full((127, 127, 127)), 1),
        "rgba": (rgba, on_white.astype(np.uint8), 1),
        "palette_with_alpha": (palette, on_white.astype(np.uint8), 1),
        "cmyk_jpeg": (encode(Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0)), "JPEG", quality=95), full((255, 0, 0)), 2),
        "smaller_1x1": (encode(Image.new("RGB", (1, 1), (5, 6, 7))), full((5, 6, 7)), 0),
        "smaller_thin_2x40": (encode(Image.new("RGB", (2, 40), (90, 30, 200))), full((90, 30, 200)), 0),
        "smaller_gradient_6x3": (encode(Image.fromarray(gradient)), np.asarray(resize(Image.fromarray(gradient))), 2),
    }


def test_unusual_modes_and_small_images_are_converted_not_skipped(tmp_path):
    cases = _converted_cases()
    names = sorted(cases)
    samples = [{"__key__": name, "png": cases[name][0], "txt": name} for name in names]
    batches, dm, skipped, _ = one_epoch(str(write_tar(tmp_path / "modes-0.tar", samples)), batch_size=1)
    assert not skipped and dm.skipped_samples == {"train": 0}
    assert [batch["key"][0] for batch in batches] == names
    rgba, palette = (batches[names.index(name)]["image"] for name in ("rgba", "palette_with_alpha"))
    assert torch.equal(rgba, palette)  # palette transparency is composited exactly like alpha
    for name, batch in zip(names, batches):
        _, expected, tolerance = cases[name]
        got = batch["image"][0].permute(1, 2, 0).add(1.0).mul(127.5).round().to(torch.int64).numpy()
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert np.abs(got - expected.astype(np.int64)).max() <= tolerance, (name, got[..., 0], expected[..., 0])


# ---------------------------------------------------------------- damaged tars

def _shards_with_damaged_second(tmp_path, damage) -> tuple[str, str]:
    """a-0.tar with 4 good samples (a0..a3), b-1.tar with 6 (b0..b5) damaged by `damage(path)`."""
    write_tar(tmp_path / "a-0.tar", [good_sample(index, "a") for index in range(4)])
    damaged = write_tar(tmp_path / "b-1.tar", [good_sample(index, "b") for index in range(6)])
    damage(damaged)
    return str(tmp_path / "*.tar*"), str(damaged)


def _cut(path, offset: int) -> None:
    path.write_bytes(path.read_bytes()[:offset])


def test_tar_cut_inside_a_header_is_named_and_the_rest_is_read(tmp_path):
    pattern, shard = _shards_with_damaged_second(tmp_path, lambda p: _cut(p, member_offsets(p, "b4.png")[0] + 100))
    batches, dm, skipped, messages = one_epoch(pattern, batch_size=4)
    keys = sorted(key for batch in batches for key in batch["key"])
    # b3 is whole (as webdataset's tarfile reader sees it); b4 and b5 are gone and cannot be counted
    assert keys == sorted([f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)])
    assert dm.skipped_samples == {"train": 0} and not skipped
    assert any(f"{shard!r} is damaged after 4 samples (the last 'b3')" in m and "cut short" in m for m in messages), messages


def test_tar_header_claiming_a_huge_member_is_not_read(tmp_path):
    def lie(path):
        data = bytearray(path.read_bytes())
        header = member_offsets(path, "b2.png")[1] - 512  # its ustar header (a PAX header comes first)
        data[header + 124 : header + 136] = b"77777777777\0"  # 8 GiB
        data[header + 148 : header + 156] = b" " * 8
        data[header + 148 : header + 155] = f"{sum(data[header : header + 512]):06o}\0".encode()
        path.write_bytes(bytes(data))

    pattern, shard = _shards_with_damaged_second(tmp_path, lie)
    batches, dm, skipped, messages = one_epoch(pattern, batch_size=2)
    keys = {key for batch in batches for key in batch["key"]}
    # The listing stops before b2; reading also loses b1, which webdataset's reader also drops (it fails before
    # the next key shows that b1 is complete); b1 is counted and named.
    assert {"a0", "a1", "a2", "a3", "b0"} == keys and len(batches) == 3
    assert dm.skipped_samples == {"train": 1}
    assert len(skipped) == 1 and f"{shard}: unreadable after 'b0'" in skipped[0] and "'b2.png'" in skipped[0], skipped
    assert "claims 8589934591 bytes, past the end of the file" in skipped[0]


@pytest.mark.parametrize("length", [b"000", b"-30", b"1x3"])
def test_broken_pax_record_neither_hangs_nor_crashes(tmp_path, length):
    """PAX records are `<length> key=value\\n` and not covered by the header checksum; a zero or negative length
    once made Python's tarfile loop forever (CVE-2019-20907)."""
    def broken_pax(path):
        with tarfile.open(path, "a", format=tarfile.PAX_FORMAT) as archive:
            info = tarfile.TarInfo("b6.png")
            info.pax_headers = {"comment": "x" * 100}
            archive.addfile(info, io.BytesIO(b""))
        data = bytearray(path.read_bytes())
        start = data.index(b" comment=x") - 3  # the 3-digit record length
        data[start : start + 3] = length
        path.write_bytes(bytes(data))

    pattern, shard = _shards_with_damaged_second(tmp_path, broken_pax)
    batches, dm, skipped, messages = one_epoch(pattern, batch_size=1)  # every sample is in the plan
    keys = {key for batch in batches for key in batch["key"]}
    assert keys == {f"a{i}" for i in range(4)} | {f"b{i}" for i in range(6)}
    if length == b"000":  # tarfile calls this header invalid and ends the archive: so do we, and say so
        assert any(f"{shard!r} is damaged after 6 samples (the last 'b5')" in m for m in messages), messages
        assert dm.skipped_samples == {"train": 0}
    else:  # tarfile stops parsing the records and reads on: b6 (an empty png) is read, skipped and named
        assert len(skipped) == 1 and f"sample 'b6' of {shard}" in skipped[0], messages
        assert dm.skipped_samples == {"train": 1}


def test_truncated_gzip_shard_goes_through_webdataset_and_is_counted(tmp_path):
    write_tar(tmp_path / "a-0.tar", [good_sample(index, "a") for index in range(4)])
    plain = write_tar(tmp_path / "plain.tmp", [good_sample(index, "b") for index in range(6)])
    gz = tmp_path / "b-1.tar.gz"
    with tarfile.open(plain) as source, tarfile.open(gz, "w:gz") as target:
        for member in source:
            target.addfile(member, source.extractfile(member))
    _cut(gz, len(gz.read_bytes()) * 3 // 4)
    batches, dm, skipped, messages = one_epoch(str(tmp_path / "*-*.tar*"), batch_size=2)
    keys = [key for batch in batches for key in batch["key"]]
    assert {"a0", "a1", "a2", "a3"} <= set(keys) and set(keys) <= {f"{p}{i}" for p in "ab" for i in range(6)}
    assert len(batches) == len(dm.train_dataloader()) >= 2
    assert any(str(gz) in m for m in messages), messages


# ---------------------------------------------------------------- two workers

def test_two_workers_skip_count_and_name_every_bad_sample(tmp_path, capfd):
    bad = {("a", 1): {"png": b""}, ("a", 4): {"txt": b"\xff\xfe"}, ("b", 2): {"png": b"GIF89a junk"},
           ("b", 5): {"txt": b"x" * 100_000}}
    for prefix in "ab":
        samples = [good_sample(index, prefix) for index in range(7)]
        for index, sample in enumerate(samples):
            sample.update(bad.get((prefix, index), {}))
        write_tar(tmp_path / f"{prefix}-0.tar", samples)
    batches, dm, _, _ = one_epoch(str(tmp_path / "*.tar"), workers=2, batch_size=2, context="spawn")
    # 14 samples = 7 batches, split 4 + 3 over the workers; every position is planned, so each bad sample is
    # counted once (by the worker that owns it) and replaced by re-reading from the start (quietly).
    keys = [key for batch in batches for key in batch["key"]]
    good = {f"{p}{i}" for p in "ab" for i in range(7)} - {f"{p}{i}" for p, i in bad}
    assert len(batches) == 7 and set(keys) == good
    for batch in batches:
        for key, caption, image in zip(batch["key"], batch["caption"], batch["image"]):
            assert caption == f"caption {key[1:]}" and torch.allclose(image, pixels(COLOURS[int(key[1:]) % len(COLOURS)]))
    assert dm.skipped_samples == {"train": 4}
    err = capfd.readouterr().err  # the workers' warnings go to their stderr
    for prefix, index in bad:
        assert f"sample '{prefix}{index}' of {tmp_path / f'{prefix}-0.tar'}" in err, err


# ---------------------------------------------------------------- issue 17: more malformed samples and shard lists

def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _raw_tar(path, samples) -> str:
    """A tar written member by member (webdataset's TarWriter cannot write one sample's entry twice)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for sample in samples:
            for name, data in sample:
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return str(path)


def _members(index: int, latent: np.ndarray | None = None) -> list[tuple[str, bytes]]:
    sample = good_sample(index)
    members = [(f"s{index}.png", sample["png"]), (f"s{index}.txt", sample["txt"])]
    if latent is not None:
        members.append((f"s{index}.latent.npy", _npy(latent)))
    return members


LATENT = np.ones((4, 2, 2), np.float32)
# case -> (members of s2, DataModule options, the reason the warning must give)
BAD_SAMPLES_17 = {
    "same_member_twice": (_members(2) + [("s2.png", good_sample(2)["png"])], {}, r"entry 'png' of this sample more than once"),
    "same_member_other_case": (_members(2) + [("s2.PNG", good_sample(2)["png"])], {}, r"entry 'png' .* more than once"),
    "tensor_of_another_shape": (_members(2, np.ones((4, 3, 3), np.float32)), {"tensor_keys": ["latent.npy"]},
                                r"latent has shape \[4, 3, 3\], the other samples \(from 's0'\) \[4, 2, 2\]"),
    "tensor_full_of_nan": (_members(2, np.full((4, 2, 2), np.nan, np.float32)), {"tensor_keys": ["latent.npy"]},
                           r"latent.npy holds non-finite values"),
    "tensor_with_one_inf": (_members(2, np.where(np.eye(2, dtype=bool), np.inf, 1.0).astype(np.float32)[None].repeat(4, 0)),
                            {"tensor_keys": ["latent.npy"]}, r"latent.npy holds non-finite values"),
    "whitespace_caption": ([("s2.png", good_sample(2)["png"]), ("s2.txt", " \t\n ")], {}, r"caption is empty or only whitespace"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES_17))
def test_a_bad_sample_costs_only_itself(tmp_path, case):
    bad, options, reason = BAD_SAMPLES_17[case]
    latent = LATENT if options.get("tensor_keys") else None
    samples = [bad if index == 2 else _members(index, latent) for index in range(5)]
    shard = _raw_tar(tmp_path / "bad-000000.tar", samples)
    batches, dm, skipped, _ = one_epoch(shard, **options)
    assert_good_batches(batches, [["s0", "s1"], ["s3", "s4"]])  # the samples after it are all used
    if latent is not None:
        assert all(torch.equal(batch["latent"], torch.ones(2, 4, 2, 2)) for batch in batches)
    assert dm.skipped_samples == {"train": 1}
    assert len(skipped) == 1 and f"sample 's2' of {shard}" in skipped[0], skipped
    assert re.search(reason, skipped[0]), skipped[0]


def _setup_error(urls) -> str:
    from data_pipelines import ShardDataModule
    from lightning_diffusion.errors import UserError

    with pytest.raises(UserError) as caught:
        ShardDataModule(urls, image_size=SIZE, batch_size=2, num_workers=0).setup("fit")
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_an_unbalanced_brace_is_one_user_error(tmp_path):
    _raw_tar(tmp_path / "x-0.tar", [_members(0)])
    message = _setup_error(str(tmp_path / "x-{0..1.tar"))
    assert "data.train_urls" in message and "unbalanced brace" in message


def test_a_dangling_symlink_among_the_shards_is_named(tmp_path):
    _raw_tar(tmp_path / "x-0.tar", [_members(0), _members(1)])
    (tmp_path / "x-1.tar").symlink_to(tmp_path / "gone.tar")
    message = _setup_error(str(tmp_path / "x-*.tar"))
    assert "x-1.tar" in message and "symbolic link to a missing file" in message
    assert "x-1.tar" in _setup_error(str(tmp_path / "x-1.tar"))


def test_an_unreadable_shard_is_named(tmp_path):
    """As root every file is readable, so the check runs in a forked child that drops to `nobody`."""
    import os

    if not hasattr(os, "fork"):
        pytest.skip("needs fork to drop privileges")
    folder = tmp_path / "shards"
    folder.mkdir()
    _raw_tar(folder / "x-0.tar", [_members(0)])
    _raw_tar(folder / "x-1.tar", [_members(1)])
    (folder / "x-1.tar").chmod(0o000)
    for part in [tmp_path, *tmp_path.parents]:
        if part != part.parent and part.stat().st_uid == os.geteuid():
            part.chmod(part.stat().st_mode | 0o005)  # let `nobody` reach the folder
    if os.geteuid() != 0:  # an ordinary user cannot read a mode-000 file: check in this process
        assert "not readable" in _setup_error(str(folder / "x-*.tar"))
        return
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            from data_pipelines.urls import resolve_shards
            from lightning_diffusion.errors import UserError

            try:
                resolve_shards(str(folder / "x-*.tar"), "data.train_urls")
                os.write(write, b"no error")
            except UserError as err:
                os.write(write, str(err).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    message = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(child, 0)
    assert "x-1.tar" in message and "not readable by this user" in message, message
