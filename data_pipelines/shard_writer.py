"""Deterministic, atomic webdataset shard writing shared by `build-emoji` and `write-shards`.

Same samples in the same order give byte-identical shards: webdataset's `TarWriter` with a fixed mtime (0),
uid/gid 0, empty user/group names, mode 0444, entries sorted by extension and the GNU tar format (long keys
work). Shards are written to a staging folder (`.staging-<prefix>`, each as `<name>.tmp` renamed when complete) and
moved into the output folder only when the writer closes without error, so a failed run (a full disk, a bad
input, an interrupt) leaves the previous shards and manifest as they were; `write_manifest` is called last and is
the "done" marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import webdataset as wds

from lightning_diffusion.errors import UserError

MANIFEST_NAME = "manifest.json"
PREVIOUS_MANIFEST = ".manifest-previous.json"  # the last manifest while its shards are being replaced
MANIFEST_FORMAT = "lightning_diffusion.shards/1"
_TAR_FORMAT = tarfile.GNU_FORMAT
_KEY_PATTERN = re.compile(r"^[^./\\\x00-\x1f\x7f][^.\\\x00-\x1f\x7f]*$")  # no dots, backslashes or controls


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard as listed in `manifest.json`."""

    name: str
    split: str
    count: int
    sha256: str
    bytes: int


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def member_bytes(name: str, size: int) -> int:
    """Bytes one tar member takes in a GNU tar: header(s) (long names add blocks) plus padded data."""
    header = tarfile.TarInfo(name).tobuf(_TAR_FORMAT, "utf-8", "surrogateescape")
    return len(header) + _padded(size)


def closed_tar_bytes(offset: int) -> int:
    """Size of the finished file: two zero blocks end the archive, then padding to a whole record."""
    end = offset + 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def check_key(key: str) -> None:
    """webdataset groups files by the name up to the first dot, so keys may not contain dots; spaces and non-ASCII
    letters are fine (tar names are UTF-8)."""
    if not _KEY_PATTERN.match(key) or "//" in key or key.endswith("/"):
        raise ValueError(f"invalid sample key {key!r}: no dots, backslashes, control characters or empty path parts")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Write samples (`key` + `{extension: bytes}`) into `<prefix>-000000.tar`, `<prefix>-000001.tar`, ...

    A new shard starts when the next sample would exceed `max_samples` samples or `max_bytes` bytes (the
    finished file's exact size, end-of-archive padding included); a single sample larger than `max_bytes`
    gets a shard of its own.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        prefix: str,
        split: str | None = None,
        max_samples: int = 1000,
        max_bytes: int | None = None,
    ) -> None:
        if max_samples < 1:
            raise UserError(f"--max-samples-per-shard must be at least 1, got {max_samples}")
        if max_bytes is not None and max_bytes < tarfile.RECORDSIZE:
            raise UserError(f"--max-bytes-per-shard must be at least {tarfile.RECORDSIZE} (one tar record), got {max_bytes}")
        if not re.match(r"^[A-Za-z0-9_\-]+$", prefix):
            raise UserError(f"shard prefix {prefix!r} may only use letters, digits, '_' and '-'")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.split = split or prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._handle: BinaryIO | None = None
        self._tar: wds.TarWriter | None = None
        self._count = 0
        self._offset = 0
        check_shards_are_ours(self.out_dir, [prefix])  # before anything is written: they would be replaced
        self.staging = self.out_dir / f".staging-{prefix}"
        shutil.rmtree(self.staging, ignore_errors=True)  # left by a run that was killed
        self.staging.mkdir(parents=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def _name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def _tmp_path(self) -> Path:
        return self.staging / (self._name + ".tmp")

    def sample_bytes(self, key: str, entries: dict[str, bytes]) -> int:
        return sum(member_bytes(f"{key}.{ext}", len(data)) for ext, data in entries.items())

    def write(self, key: str, entries: dict[str, bytes]) -> None:
        """Append one sample; entries map an extension (`png`, `txt`, `json`) to its encoded bytes."""
        check_key(key)
        size = self.sample_bytes(key, entries)
        if self._tar is not None:
            too_many = self._count >= self.max_samples
            too_big = self.max_bytes is not None and closed_tar_bytes(self._offset + size) > self.max_bytes
            if too_many or too_big:
                self._finish_shard()
        if self._tar is None:
            self._handle = open(self._tmp_path(), "wb")
            self._tar = wds.TarWriter(
                self._handle, encoder=False, mtime=0, user="", group="", mode=0o444, format="GNU_FORMAT"
            )
        self._tar.write({"__key__": key, **entries})
        self._count += 1
        self._offset += size

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._handle is not None
        self._tar.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        tmp, final = self._tmp_path(), self.staging / self._name
        os.replace(tmp, final)
        info = ShardInfo(self._name, self.split, self._count, sha256_file(final), final.stat().st_size)
        self.shards.append(info)
        self._tar, self._handle, self._count, self._offset = None, None, 0, 0

    def close(self) -> list[ShardInfo]:
        """Finish the open shard, move every shard into the output folder, and return them.

        The old manifest is removed first: the folder is not "done" again until the caller rewrites it."""
        if self._tar is not None:
            self._finish_shard()
        if self.shards:
            set_aside_manifest(self.out_dir)
        for shard in self.shards:
            os.replace(self.staging / shard.name, self.out_dir / shard.name)
        shutil.rmtree(self.staging, ignore_errors=True)
        return list(self.shards)

    def abort(self) -> None:
        """Drop everything this writer wrote; the output folder keeps its previous shards and manifest."""
        if self._tar is not None:
            assert self._handle is not None
            self._handle.close()
            self._tar, self._handle = None, None
        shutil.rmtree(self.staging, ignore_errors=True)
        self.shards = []


def set_aside_manifest(out_dir: Path) -> None:
    """Before shards are replaced: the folder is not "done" until a new manifest is written, but the old one stays
    (as `PREVIOUS_MANIFEST`) as the record of which shard files this project wrote there."""
    manifest = Path(out_dir) / MANIFEST_NAME
    if manifest.is_file():
        os.replace(manifest, Path(out_dir) / PREVIOUS_MANIFEST)


def recorded_shards(out_dir: Path) -> set[str]:
    """The shard names an earlier run recorded in `out_dir` (its manifest, or the one set aside by a run that was
    interrupted before writing its own)."""
    names: set[str] = set()
    for name in (MANIFEST_NAME, PREVIOUS_MANIFEST):
        try:
            names |= {s["name"] for s in json.loads((Path(out_dir) / name).read_text(encoding="utf-8"))["shards"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return names


def check_shards_are_ours(out_dir: Path, prefixes: Iterable[str], key: str = "--out") -> None:
    """Refuse an output folder holding `<prefix>-NNNNNN.tar` files no manifest there lists: this run would overwrite
    or delete them, and they are someone else's (another tool's shards, or copied in by hand)."""
    if not Path(out_dir).is_dir():
        return
    pattern = re.compile(rf"^({'|'.join(re.escape(p) for p in prefixes)})-\d{{6}}\.tar$")
    recorded = recorded_shards(out_dir)
    foreign = sorted(p.name for p in Path(out_dir).iterdir() if pattern.match(p.name) and p.name not in recorded)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(f"{key}: '{out_dir}' holds {foreign[0]}{more}, which no manifest.json there lists (another "
                        f"tool's shards?): this run would overwrite or delete them; move them away or choose another "
                        f"{key}")


def remove_stale_shards(out_dir: Path, prefix: str, keep: set[str]) -> None:
    """Delete the `<prefix>-NNNNNN.tar` files an earlier run recorded that this run did not write (never others)."""
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
    for name in recorded_shards(out_dir) - keep:
        if pattern.match(name) and (Path(out_dir) / name).is_file():
            (Path(out_dir) / name).unlink()


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The manifest of an earlier run in `out_dir`, or None."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}; delete it and run again") from err


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest.json` atomically (sorted keys, no timestamps, so equal builds give equal files)."""
    manifest = {"format": MANIFEST_FORMAT, **manifest}
    manifest["shards"] = [asdict(s) if isinstance(s, ShardInfo) else s for s in manifest.get("shards", [])]
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())
    (Path(out_dir) / PREVIOUS_MANIFEST).unlink(missing_ok=True)
    return path
