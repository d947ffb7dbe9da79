"""`write-shards`: webdataset shards from your own images, for any of the three models.

SOURCE is either a folder of images with sidecar captions (`cat.jpg` + `cat.txt`, searched recursively) or a
CSV/JSONL manifest with `path`, `caption` and optional integer `label` (relative paths are resolved against the
manifest's folder). Each sample gets `__key__`, the image, `txt` and `json` (`source_file`, plus `label` when
given). Images are stored as their original bytes when they are RGB or greyscale JPEG/PNG/WebP and neither
`--resize` nor `--center-crop` is asked for; otherwise they are flattened on white, cropped/resized and stored
as PNG. Bad rows (missing file, unreadable image, missing or empty caption, bad label) are reported and
skipped; the run fails (exit 2) only when nothing could be written. `manifest.json` lists the shards with
counts and sha256; shards of other prefixes already listed there are kept, so `--prefix train` and
`--prefix val` runs can share one folder.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from lightning_diffusion.arguments import check_output_dir, positive_int
from lightning_diffusion.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PASS_THROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MAX_REPORTED = 50


@dataclass
class Candidate:
    """One would-be sample: where it came from (for messages), its image path, caption and label."""

    where: str
    key: str
    path: Path | None
    caption: str | None
    label: object = None
    problem: str | None = None


class Skip(Exception):
    """A sample that cannot be written; the message is the reason counted in the summary."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="folder of images with .txt captions, or a .csv / .jsonl manifest")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--prefix", default="train", help="shard name prefix and split name (default train)")
    parser.add_argument("--resize", type=positive_int, default=None, help="scale so the shorter side is N pixels")
    parser.add_argument("--center-crop", action="store_true", help="crop the largest centred square")
    parser.add_argument("--max-samples-per-shard", type=positive_int, default=1000, help="default 1000")
    parser.add_argument("--max-bytes-per-shard", type=positive_int, default=None, help="cap on a shard file's size in bytes")


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_/\-]+", "_", text).strip("/") or "_"


def _from_folder(folder: Path) -> Iterator[Candidate]:
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        relative = path.relative_to(folder)
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8", errors="replace") if sidecar.exists() else None
        problem = None if caption is not None else "missing caption"
        yield Candidate(f"file {relative}", _sanitise(relative.with_suffix("").as_posix()), path, caption, None, problem)


def _row_candidate(where: str, index: int, row: dict, base: Path) -> Candidate:
    raw_path = row.get("path")
    if raw_path is None or not str(raw_path).strip():
        return Candidate(where, "", None, None, problem="missing path")
    path = Path(str(raw_path).strip())
    path = path if path.is_absolute() else base / path
    caption = row.get("caption")
    key = f"{index:07d}_{_sanitise(path.stem)}"
    label = row.get("label")
    problem = "missing caption" if caption is None else None
    return Candidate(where, key, path, None if caption is None else str(caption), label, problem)


def _from_csv(manifest: Path) -> Iterator[Candidate]:
    with open(manifest, newline="", encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is read, not kept
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if not {"path", "caption"} <= columns:
            raise UserError(f"{manifest} needs a header with columns path,caption[,label]; found {sorted(columns)}")
        for index, row in enumerate(reader):
            yield _row_candidate(f"{manifest.name} line {reader.line_num}", index, row, manifest.parent)


def _from_jsonl(manifest: Path) -> Iterator[Candidate]:
    index = 0
    with open(manifest, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{manifest.name} line {number}"
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError as err:
                yield Candidate(where, "", None, None, problem=f"bad row ({err})")
                continue
            yield _row_candidate(where, index, row, manifest.parent)
            index += 1


def candidates(source: Path) -> list[Candidate]:
    """Every would-be sample of SOURCE, in a fixed order (sorted files, or manifest order)."""
    if source.is_dir():
        return list(_from_folder(source))
    if not source.is_file():
        raise UserError(f"{source} does not exist: give a folder of images with .txt captions, or a .csv/.jsonl manifest")
    reader = {".csv": _from_csv, ".jsonl": _from_jsonl, ".ndjson": _from_jsonl}.get(source.suffix.lower())
    if reader is not None:
        try:
            return list(reader(source))
        except UnicodeDecodeError as err:
            raise UserError(f"{source} is not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r}): "
                            "save the manifest as UTF-8 and run again") from None
    raise UserError(f"{source}: expected a folder, a .csv or a .jsonl manifest")


def _label(value: object) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise Skip("bad label")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)
    raise Skip("bad label")


def encode_sample(candidate: Candidate, resize: int | None, center_crop: bool, base: Path) -> dict[str, bytes]:
    """The sample's entries, or `Skip(reason)`."""
    from PIL import Image, UnidentifiedImageError

    from data_pipelines.image_prep import center_crop_square, flatten_on_white, png_bytes, resize_shorter_side

    if candidate.problem:
        raise Skip(candidate.problem)
    assert candidate.path is not None
    if not candidate.path.is_file():
        raise Skip("missing file")
    caption = (candidate.caption or "").strip()
    if not caption:
        raise Skip("empty caption")
    label = _label(candidate.label)
    data = candidate.path.read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        raise Skip("unreadable image") from None
    extension = PASS_THROUGH.get(image.format or "")
    if resize is not None or center_crop or extension is None or image.mode not in ("RGB", "L"):
        image = flatten_on_white(image)
        if center_crop:
            image = center_crop_square(image)
        if resize is not None:
            image = resize_shorter_side(image, resize)
        extension, data = "png", png_bytes(image)
    try:
        source_file = candidate.path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        source_file = candidate.path.as_posix()
    meta: dict[str, object] = {"source_file": source_file}
    if label is not None:
        meta["label"] = label
    return {extension: data, "txt": caption.encode(), "json": json.dumps(meta, sort_keys=True).encode()}


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from data_pipelines.shard_writer import ShardWriter, read_manifest, remove_stale_shards, write_manifest

    source, out = Path(args.source), check_output_dir(args.out, "--out")
    base = source if source.is_dir() else source.parent
    rows = candidates(source)
    previous = read_manifest(out) if out.exists() else None
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    reported = 0
    writer = ShardWriter(out, args.prefix, max_samples=args.max_samples_per_shard, max_bytes=args.max_bytes_per_shard)
    with writer, tqdm(rows, desc="write-shards", unit="img", file=sys.stderr, mininterval=2.0) as progress:
        for candidate in progress:
            try:
                if candidate.key and candidate.key in seen:
                    raise Skip("duplicate key")
                entries = encode_sample(candidate, args.resize, args.center_crop, base)
            except Skip as skip:
                skipped[str(skip)] += 1
                if reported < MAX_REPORTED:
                    progress.write(f"skipped {candidate.where}: {skip}", file=sys.stderr)
                reported += 1
                continue
            seen.add(candidate.key)
            writer.write(candidate.key, entries)
    if reported > MAX_REPORTED:
        print(f"... and {reported - MAX_REPORTED} more skipped", file=sys.stderr)
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items())) or "none"
    if not seen:
        raise UserError(f"no samples written from {source} ({len(rows)} candidates; skipped: {reasons})")
    remove_stale_shards(out, args.prefix, {s.name for s in writer.shards})
    kept = [
        s for s in (previous or {}).get("shards", [])
        if s.get("split") != args.prefix and not s["name"].startswith(f"{args.prefix}-") and (out / s["name"]).exists()
    ]
    shards = sorted(kept + [asdict(s) for s in writer.shards], key=lambda s: s["name"])
    counts: dict[str, dict[str, int]] = {}
    for shard in shards:
        counts.setdefault(shard["split"], {"total": 0})["total"] += shard["count"]
    write_manifest(
        out,
        {
            "dataset": out.name,
            "created_by": "python -m data_pipelines write-shards",
            "image_size": args.resize if args.center_crop and args.resize else None,
            "options": {
                args.prefix: {
                    "source": str(source),
                    "resize": args.resize,
                    "center_crop": args.center_crop,
                    "max_samples_per_shard": args.max_samples_per_shard,
                    "max_bytes_per_shard": args.max_bytes_per_shard,
                }
            }
            | {k: v for k, v in ((previous or {}).get("options") or {}).items() if k != args.prefix and isinstance(v, dict)},
            "counts": counts,
            "shards": shards,
        },
    )
    print(
        f"wrote {len(seen)} samples in {len(writer.shards)} shards to {out}; skipped {sum(skipped.values())}: {reasons}",
        file=sys.stderr,
    )
    return 0
