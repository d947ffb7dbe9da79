"""Samples per shard, from the builder's `manifest.json` when it is current, else by listing tar headers.

Exhaustive epochs need the counts to give every rank the same number of full batches. Listing reads only the
tar headers (the file is seeked over, nothing is decoded) and groups members into samples exactly as
webdataset does (`base_plus_ext`, consecutive equal keys, `__meta__` files skipped).
"""

from __future__ import annotations

import json
import lzma
import os
import re
import tarfile
import warnings

from webdataset.tariterators import base_plus_ext

from data_pipelines.tar_members import is_plain_tar, sample_keys
from data_pipelines.urls import url_scheme
from lightning_diffusion.errors import UserError

MANIFEST_NAME = "manifest.json"
_META = re.compile(r"__[^/]*__($|/)")


def count_tar_samples(path: str) -> int:
    """Number of webdataset samples in a local tar, from its headers; damage ends the count (with a warning).

    Uncompressed tars are listed by the reader that will read them (`tar_members`), so the count stops exactly
    where reading will; compressed ones by `tarfile`.
    """
    count, last = 0, None
    try:
        if is_plain_tar(path):
            for last in sample_keys(path):
                count += 1
            return count
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:
                if not member.isreg() or _META.match(member.name):
                    continue
                prefix, _ = base_plus_ext(member.name)
                if prefix is None or prefix == last:
                    continue
                count, last = count + 1, prefix
    except (tarfile.TarError, EOFError, OSError, ValueError, lzma.LZMAError) as exn:
        after = f"after {count} samples (the last {last!r})" if last is not None else "from its start"
        warnings.warn(f"shard {path!r} is damaged {after}: {exn}; the rest is not used, rebuild it", stacklevel=2)
    return count


def _manifest_entries(directory: str) -> tuple[dict[str, dict], float]:
    """name -> entry from `<directory>/manifest.json` (empty when absent) and the manifest's mtime."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        return {}, 0.0
    try:
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)["shards"]
        listed = {str(entry["name"]): {"count": int(entry["count"]), "bytes": entry.get("bytes")} for entry in entries}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exn:
        raise UserError(
            f"{path} is not a valid shard manifest ({exn!r}); rebuild the shards or delete the manifest"
        ) from exn
    return listed, os.path.getmtime(path)


def _is_current(url: str, entry: dict, manifest_mtime: float) -> bool:
    """A manifest entry describes the file if its recorded size matches (or, without a size, it is not newer)."""
    if entry["bytes"] is not None:
        return int(entry["bytes"]) == os.path.getsize(url)
    return os.path.getmtime(url) <= manifest_mtime


def shard_sample_counts(urls: list[str], key: str) -> list[int]:
    """Per-shard sample counts of local shards: from manifest.json where it is current, else from the tar headers."""
    manifests: dict[str, tuple[dict[str, dict], float]] = {}
    counts = []
    for url in urls:
        if url_scheme(url) is not None:
            raise UserError(
                f"{key}: {url!r} is remote and exhaustive epochs need per-shard sample counts; "
                "use data.mode: resampled with data.samples_per_epoch, or local shards"
            )
        directory = os.path.dirname(os.path.abspath(url))
        if directory not in manifests:
            manifests[directory] = _manifest_entries(directory)
        listed, manifest_mtime = manifests[directory]
        entry = listed.get(os.path.basename(url))
        counts.append(entry["count"] if entry is not None and _is_current(url, entry, manifest_mtime) else count_tar_samples(url))
    return counts
