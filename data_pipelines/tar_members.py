"""Fast member reader for local, uncompressed tar shards (the common case), feeding webdataset's `group_by_keys`.

Python's `tarfile` spends ~70 us per member on header parsing and stream emulation, as much as decoding a 64 px
PNG, which kept the DataModule well under the raw-PIL rate. This reader parses the fixed ustar header directly
(checksum verified; GNU long names and PAX `path`/`size` records honoured), applies the same member filters as
webdataset's `tar_file_iterator`, and can seek over the samples before a worker's start without reading them.
Compressed or remote shards go through webdataset's own reader instead (see `stream.py`).

Damaged shards: it reads exactly what `tarfile` (hence webdataset) reads, checked by a fuzz test
(tests/test_malformed_fuzz.py): numeric fields and checksums parsed as `tarfile.nti` does, PAX records as its
regex loop does (a zero length, which once looped forever, is damage), global PAX headers applied, no data for
links and directories. Where `tarfile` ends the archive quietly at a bad header (so `group_by_keys` still yields
the sample before it), this reader yields webdataset's end-of-shard marker `{}` and then raises
`tarfile.ReadError`; where `tarfile` raises (data or padding cut short, damage right after a PAX header) it
raises, and the unfinished sample is dropped by both. A size past the end of the file is refused before reading.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from webdataset.tariterators import base_plus_ext

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_META = re.compile(r"__[^/]*__($|/)")
_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: tarfile reads no data for them
_EXTENDED = (b"L", b"K", b"x", b"X", b"g")
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337), (337, 345))
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
# Fast path for the numeric fields: octal digits -> "d", NUL -> "z", anything else -> "x"; the layouts every
# writer we know uses (tarfile, GNU tar) are accepted at once, others are parsed field by field.
_SHAPE = bytes(ord("d") if chr(i) in "01234567" else ord("z") if i == 0 else ord("x") for i in range(256))
_USUAL_NUMBERS = b"dddddddz" * 3 + b"dddddddddddz" * 2
_USUAL_DEVICES = (b"z" * 16, b"dddddddz" * 2)


def _number(field: bytes) -> int:
    """A numeric header field as `tarfile.nti` reads it: octal text or GNU base-256; ValueError otherwise."""
    if field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)


def _valid_header(header: bytes) -> bool:
    """Checksum (unsigned or signed, as tarfile accepts) and every numeric field parse."""
    try:
        stored = _number(header[148:156])
        usual = header[100:148].translate(_SHAPE) == _USUAL_NUMBERS and header[329:345].translate(_SHAPE) in _USUAL_DEVICES
        if not usual:
            for start, stop in _NUMBER_FIELDS:
                _number(header[start:stop])
    except ValueError:
        return False
    unsigned = sum(header[:148]) + 256 + sum(header[156:])
    if stored == unsigned:
        return True
    high = sum(1 for byte in header[:148] if byte > 127) + sum(1 for byte in header[156:] if byte > 127)
    return stored == unsigned - 256 * high


def is_plain_tar(path: str) -> bool:
    """An uncompressed tar whose first header checks out (a compressed shard starts with other magic bytes)."""
    with open(path, "rb") as handle:
        header = handle.read(BLOCK)
    return len(header) == BLOCK and (header == _ZERO_BLOCK or _valid_header(header))


class _HeaderDamage(tarfile.ReadError):
    """A header that does not parse: `tarfile` ends the archive quietly here (after the members before it)."""


def _pax_records(payload: bytes, offset: int) -> dict[str, str]:
    """`<length> <key>=<value>\\n` records, parsed as `tarfile` does: the first record that does not match ends
    the list; a zero length is damage (it would loop forever). Lengths are positive, so this always ends."""
    records, position = {}, 0
    while (match := _PAX_RECORD.match(payload, position)) is not None:
        length = int(match.group(1))
        if length == 0:
            raise _HeaderDamage(f"damaged PAX record in the tar header at byte {offset}")
        value = payload[match.end(2) + 1 : match.start(1) + length - 1]
        records[match.group(2).decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _header(handle: BinaryIO, offset: int, extended: bool) -> bytes | None:
    """The next 512-byte header, None at the end of the archive; damage raises `_HeaderDamage` where `tarfile`
    would end quietly, `tarfile.ReadError` right after a long-name or PAX header (where `tarfile` raises)."""
    header = handle.read(BLOCK)
    problem = None
    if not header or header == _ZERO_BLOCK:
        problem = f"the archive ends after a long-name or PAX header, at byte {offset}" if extended else None
    elif len(header) < BLOCK:
        problem = f"tar header cut short at byte {offset}"
    elif not _valid_header(header):
        problem = f"damaged tar header at byte {offset}"
    else:
        return header
    if problem is None:
        return None
    raise (tarfile.ReadError if extended else _HeaderDamage)(problem)


def _members(handle: BinaryIO, file_size: int) -> Iterator[tuple[str, int, bool]]:
    """(name, size, is a sample file) per member as `tarfile` sees it, the handle at the start of its data; the
    caller moves past the data. Raises `tarfile.ReadError` (`_HeaderDamage` where `tarfile` ends quietly)."""
    long_name, pax, global_pax, extended = None, {}, {}, False
    while True:
        offset = handle.tell()
        if offset > file_size:  # the previous member's padding is cut: tarfile raises before the next header
            raise tarfile.ReadError(f"unexpected end of data before byte {offset}")
        header = _header(handle, offset, extended)
        if header is None:
            return
        size, kind = _number(header[124:136]), header[156:157]
        if kind == b"\0" and _text(header[:100]).endswith("/"):
            kind = b"5"  # old-style directory
        if size < 0 or offset + BLOCK + size > file_size:
            name = _text(header[:100])
            raise tarfile.ReadError(f"tar member {name!r} at byte {offset} claims {size} bytes, past the end of the file")
        if kind in _EXTENDED:
            payload = handle.read(_padded(size))
            if kind == b"L":
                long_name = _text(payload)
            elif kind in (b"x", b"X"):
                pax = _pax_records(payload[:size], offset)
            elif kind == b"g":
                global_pax = {**global_pax, **_pax_records(payload[:size], offset)}
            extended = True
            continue
        if kind == b"S":
            raise tarfile.ReadError(f"tar member at byte {offset} is a GNU sparse file, which shards never hold")
        records = {**global_pax, **pax} if global_pax else pax
        if "path" in records:
            name = records["path"].rstrip("/")
        elif long_name is not None:
            name = long_name
        else:
            name, prefix = _text(header[:100]), _text(header[345:500])
            name = prefix + "/" + name if prefix else name
        if "size" in records:
            try:
                size = int(records["size"])
            except ValueError:
                size = 0
            if size < 0 or offset + BLOCK + size > file_size:
                raise tarfile.ReadError(f"tar member {name!r} at byte {offset}: PAX size {records['size']!r} is past the end")
        long_name, pax, extended = None, {}, False
        if kind in _NO_DATA:
            size = 0
        skip = kind not in _REGULAR or ("/" not in name and name.startswith("__") and name.endswith("__"))
        yield name, size, not (skip or _META.match(name))


def local_tar_files(path: str, skip_samples: int = 0) -> Iterator[dict[str, Any]]:
    """`{"fname", "data", "__url__"}` per member, as webdataset's tar reader yields them.

    Members of the first `skip_samples` samples (runs of equal keys) are seeked over, not read. A truncated or
    damaged archive raises `tarfile.ReadError` at the point of damage (after `{}` where `tarfile` would end).
    """
    with open(path, "rb", buffering=1 << 20) as handle:
        file_size = os.fstat(handle.fileno()).st_size
        prefix, sample_index = None, -1
        try:
            for name, size, wanted in _members(handle, file_size):
                key, _ = base_plus_ext(name)
                if wanted and key is not None and key != prefix:
                    prefix, sample_index = key, sample_index + 1
                if not wanted or key is None or sample_index < skip_samples:
                    handle.seek(_padded(size), os.SEEK_CUR)
                    continue
                data = handle.read(size)
                if len(data) < size:
                    raise tarfile.ReadError(f"unexpected end of data in {name!r}")
                handle.seek(_padded(size) - size, os.SEEK_CUR)
                yield {"fname": name, "data": data, "__url__": path}
        except _HeaderDamage:
            if sample_index >= skip_samples:
                yield {}  # webdataset's end of shard: the sample read so far is complete as far as tarfile can tell
            raise


def sample_keys(path: str) -> Iterator[str]:
    """The key of each sample of a local uncompressed tar, in order, from the headers alone (as `group_by_keys`
    groups members: runs of equal keys). Raises `tarfile.ReadError` where the archive is damaged."""
    with open(path, "rb", buffering=1 << 16) as handle:
        file_size = os.fstat(handle.fileno()).st_size
        previous = None
        for name, size, wanted in _members(handle, file_size):
            handle.seek(_padded(size), os.SEEK_CUR)
            key, _ = base_plus_ext(name)
            if wanted and key is not None and key != previous:
                previous = key
                yield key
