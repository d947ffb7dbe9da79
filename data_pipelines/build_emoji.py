"""`build-emoji`: the embedded image-caption dataset, Microsoft's Fluent Emoji in two styles, as webdataset shards.

Each sample is `png` (flattened on white, `--size` square), `txt` ("a 3D rendered emoji of koala",
"a flat vector emoji of man dancing, medium-dark skin tone": skin-tone variants are kept and named in the
caption) and `json` (source, style, concept, codepoints, skin tones, licence). The train/validation split is by
concept (the name without skin tones): a concept is held out when `sha256(seed, concept)` falls below
`--val-fraction`, so every style and tone of it is held out together and the split does not move when `--limit`
changes. `--limit N` keeps N concepts chosen by another seeded hash (growing N only adds concepts).
Shards are `train-000000.tar`, `val-000000.tar`, ...; `manifest.json` (written last) lists them with counts and
sha256, and `LICENSES.md` carries the attribution. Same inputs give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

from lightning_diffusion.arguments import check_output_dir
from lightning_diffusion.errors import UserError

SPLITS = ("train", "val")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder for shards, manifest.json and LICENSES.md")
    parser.add_argument("--size", type=int, default=64, help="square image size in pixels (default 64)")
    parser.add_argument("--limit", type=int, default=None, help="keep only this many concepts (a fixed seeded subset)")
    parser.add_argument("--sources", default="3d,flat", help="comma-separated styles to include: 3d, flat (default both)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of concepts held out (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the concept split and of the sample order")
    parser.add_argument("--cache", default=None, help="where npm packages are fetched (default ~/.cache/lightning_diffusion/npm)")
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")


def unit_hash(seed: int, purpose: str, text: str) -> float:
    """A number in [0, 1) that depends only on (seed, purpose, text): stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}\x00{purpose}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(concept: str, seed: int, val_fraction: float) -> str:
    return "val" if unit_hash(seed, "split", concept) < val_fraction else "train"


def caption(caption_style: str, concept: str, skin_tones: tuple[str, ...]) -> str:
    """"a 3D rendered emoji of man dancing, medium-dark skin tone"."""
    text = f"a {caption_style} emoji of {concept}"
    if skin_tones:
        tones = list(dict.fromkeys(skin_tones))
        text += ", " + " and ".join(f"{tone} skin tone" for tone in tones)
    return text


def _parse_sources(text: str) -> list[str]:
    from data_pipelines.emoji_sources import SOURCES

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SOURCES]
    if not names or unknown:
        raise UserError(f"--sources {text!r}: use a comma-separated subset of {', '.join(SOURCES)}")
    return sorted(set(names), key=list(SOURCES).index)


def _validate(args: argparse.Namespace) -> None:
    check_output_dir(args.out, "--out")
    if args.size < 8:
        raise UserError(f"--size must be at least 8 pixels, got {args.size}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1 concept, got {args.limit}")
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {args.shard_size}")


def render(path: Path, size: int):  # noqa: ANN201 - returns a PIL image; PIL imported lazily
    """A `size` x `size` RGB image on white from a WebP/PNG or an SVG (rasterised at 4x, then Lanczos)."""
    import io

    import cairosvg
    from PIL import Image

    from data_pipelines.image_prep import flatten_on_white, pad_to_square

    if path.suffix == ".svg":
        image = Image.open(io.BytesIO(cairosvg.svg2png(url=str(path), output_width=4 * size)))
    else:
        image = Image.open(path)
    image = pad_to_square(flatten_on_white(image))
    return image.resize((size, size), Image.Resampling.LANCZOS) if image.size != (size, size) else image


def _licences_text(sources: list) -> str:
    lines = [
        "# Licences and attribution",
        "",
        "The images in these shards are Microsoft's Fluent Emoji, resized and flattened on white by",
        "`python -m data_pipelines build-emoji`. Captions are built from Unicode CLDR names via the PyPI `emoji` package.",
        "",
    ]
    for source in sources:
        lines += [f"- npm `{source.spec}` ({source.licence}), {source.homepage}: {source.attribution}."]
    lines += [
        "",
        "## MIT License",
        "",
        "Copyright (c) Microsoft Corporation; Copyright (c) 2023 LobeHub; Copyright (c) 2022 Mohammad Abu Mattar",
        "",
        "Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated",
        'documentation files (the "Software"), to deal in the Software without restriction, including without limitation',
        "the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and",
        "to permit persons to whom the Software is furnished to do so, subject to the following conditions:",
        "",
        "The above copyright notice and this permission notice shall be included in all copies or substantial portions",
        "of the Software.",
        "",
        'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO',
        "THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE",
        "AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF",
        "CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER",
        "DEALINGS IN THE SOFTWARE.",
        "",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from data_pipelines import emoji_sources
    from data_pipelines.image_prep import png_bytes
    from data_pipelines.shard_writer import (
        ShardWriter,
        atomic_write_bytes,
        check_shards_are_ours,
        remove_stale_shards,
        set_aside_manifest,
        write_manifest,
    )

    _validate(args)
    names = _parse_sources(args.sources)
    sources = [emoji_sources.SOURCES[name] for name in names]
    cache = Path(args.cache).expanduser() if args.cache else emoji_sources.default_cache_dir()
    out = Path(args.out)

    images, source_records = [], []
    for source in sources:
        root = emoji_sources.fetch(source, cache)
        listing = emoji_sources.LISTERS[source.name](root, source)
        images += listing.images
        source_records.append(
            {
                "name": source.name,
                "npm": source.spec,
                "style": source.caption_style,
                "licence": source.licence,
                "attribution": source.attribution,
                "homepage": source.homepage,
                "tarball_sha256": emoji_sources.tarball_sha256(source, cache),
                "images_available": len(listing.images),
                "files_skipped_as_duplicates": listing.duplicates,
                "files_" + ("skipped_unnamed" if source.name == "3d" else "named_by_file_name"): listing.odd,
            }
        )
    concepts = sorted({image.concept for image in images})
    if args.limit is not None:
        concepts = sorted(sorted(concepts, key=lambda c: unit_hash(args.seed, "subset", c))[: args.limit])
    chosen = set(concepts)
    by_split: dict[str, list] = {split: [] for split in SPLITS}
    for image in images:
        if image.concept in chosen:
            by_split[split_of(image.concept, args.seed, args.val_fraction)].append(image)
    for split in SPLITS:
        by_split[split].sort(key=lambda im: (unit_hash(args.seed, "order", im.key), im.key))

    check_shards_are_ours(out, SPLITS)  # both splits up front (each ShardWriter checks its own again)
    out.mkdir(parents=True, exist_ok=True)
    set_aside_manifest(out)  # the build is "done" only once a new manifest is written
    total = sum(len(v) for v in by_split.values())
    shards, counts = [], {}
    with tqdm(total=total, desc="build-emoji", unit="img", file=sys.stderr, mininterval=2.0) as progress:
        for split in SPLITS:
            with ShardWriter(out, prefix=split, max_samples=args.shard_size) as writer:
                for image in by_split[split]:
                    source = emoji_sources.SOURCES[image.source]
                    text = caption(source.caption_style, image.concept, image.skin_tones)
                    meta = {
                        "caption": text,
                        "codepoints": image.codepoints,
                        "concept": image.concept,
                        "file": image.path.relative_to(emoji_sources.package_dir(source, cache) / "package").as_posix(),
                        "licence": source.licence,
                        "named_by": image.named_by,
                        "skin_tones": list(image.skin_tones),
                        "source": f"npm:{source.spec}",
                        "split": split,
                        "style": source.name,
                    }
                    entries = {
                        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode(),
                        "png": png_bytes(render(image.path, args.size)),
                        "txt": text.encode(),
                    }
                    writer.write(image.key, entries)
                    progress.update(1)
            shards += writer.shards
            remove_stale_shards(out, split, {s.name for s in writer.shards})
            styles = Counter(image.source for image in by_split[split])
            counts[split] = {
                "total": len(by_split[split]),
                "concepts": len({image.concept for image in by_split[split]}),
                **{name: styles.get(name, 0) for name in names},
            }

    atomic_write_bytes(out / "LICENSES.md", _licences_text(sources).encode())
    write_manifest(
        out,
        {
            "dataset": "fluent-emoji",
            "created_by": "python -m data_pipelines build-emoji",
            "image_size": args.size,
            "image_format": "png, RGB, flattened on white",
            "options": {
                "size": args.size,
                "limit": args.limit,
                "sources": names,
                "val_fraction": args.val_fraction,
                "seed": args.seed,
                "shard_size": args.shard_size,
            },
            "split": "by concept: val when sha256(seed, concept) < val_fraction",
            "counts": counts,
            "shards": shards,
            "sources": source_records,
            "licence": "MIT",
            "attribution": "Microsoft Fluent Emoji (MIT); see LICENSES.md",
        },
    )
    summary = ", ".join(f"{split} {counts[split]['total']} ({counts[split]['concepts']} concepts)" for split in SPLITS)
    print(f"wrote {len(shards)} shards to {out}: {summary}", file=sys.stderr)
    return 0
