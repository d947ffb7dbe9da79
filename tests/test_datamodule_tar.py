"""The fast local tar reader yields exactly what webdataset's tarfile-based reader yields, and fails the same way."""

from __future__ import annotations

import io
import tarfile

import pytest
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipelines.tar_members import is_plain_tar, local_tar_files


def add(archive: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write(path, fmt=tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as archive:
        add(archive, "__meta__", b"skipped")
        add(archive, "dir", kind=tarfile.DIRTYPE)
        for index in range(5):
            key = f"dir/sample{index}" if index != 2 else "long/" + "x" * 150 + "/naïve-é"
            add(archive, f"{key}.png", bytes([index]) * (700 * index + 1))
            add(archive, f"{key}.TXT", f"caption {index}".encode())
        add(archive, "noextension", b"ignored by group_by_keys")


def reference(path):
    with open(path, "rb") as stream:
        return list(group_by_keys(tar_file_expander(iter([{"url": str(path), "stream": stream}]))))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_same_samples_as_webdataset_and_skips_without_reading(tmp_path, fmt):
    path = tmp_path / "shard.tar"
    write(path, fmt)
    assert is_plain_tar(str(path))
    expected = reference(path)
    assert len(expected) == 5
    for skip in range(7):
        got = list(group_by_keys(local_tar_files(str(path), skip_samples=skip)))
        assert got == expected[skip:]


def test_damage_raises_and_compressed_shards_are_not_plain(tmp_path):
    path = tmp_path / "shard.tar"
    write(path)
    whole = path.read_bytes()
    with tarfile.open(path) as archive:
        pngs = [m for m in archive.getmembers() if m.name.endswith(".png")]
        cut, header = pngs[3].offset_data + 100, pngs[1].offset
    path.write_bytes(whole[:cut])
    files = local_tar_files(str(path))
    with pytest.raises(tarfile.ReadError):
        list(group_by_keys(files))
    with pytest.raises(tarfile.ReadError):
        list(local_tar_files(str(path), skip_samples=4))
    garbled = bytearray(whole)
    garbled[header + 20 : header + 60] = b"\xff" * 40
    path.write_bytes(bytes(garbled))
    with pytest.raises(tarfile.ReadError, match="damaged"):
        list(local_tar_files(str(path)))
    with tarfile.open(tmp_path / "shard.tar.gz", "w:gz") as archive:
        add(archive, "a.txt", b"x")
    assert not is_plain_tar(str(tmp_path / "shard.tar.gz"))
