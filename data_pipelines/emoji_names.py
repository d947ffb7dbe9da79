"""Emoji sequences -> clean concept names and skin tones, and file names -> sequences, via PyPI `emoji`.

The concept of an emoji is its name without skin tones ("man dancing"); the tones are kept separately so
captions can say "man dancing, medium-dark skin tone" and the train/validation split can hold out every tone
and style of a concept together.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

import emoji

VS16 = "\ufe0f"
SKIN_TONES: dict[str, str] = {
    "\U0001f3fb": "light",
    "\U0001f3fc": "medium-light",
    "\U0001f3fd": "medium",
    "\U0001f3fe": "medium-dark",
    "\U0001f3ff": "dark",
}
_TONE_PHRASE = re.compile(r"_?(medium-light|medium-dark|light|medium|dark)_skin_tone")
_REGIONAL = range(0x1F1E6, 0x1F200)
_BLACK_FLAG, _CANCEL_TAG = "\U0001f3f4", "\U000e007f"


@dataclass(frozen=True)
class EmojiName:
    """What a caption needs: the fully-qualified sequence, its concept and its skin tones."""

    sequence: str
    concept: str
    skin_tones: tuple[str, ...]

    @property
    def codepoints(self) -> str:
        return "-".join(f"{ord(c):x}" for c in self.sequence)


def canonical(sequence: str) -> str:
    """The sequence without variation selectors: one key for `2708` and `2708-fe0f`."""
    return sequence.replace(VS16, "")


def split_tones(sequence: str) -> tuple[str, tuple[str, ...]]:
    """(canonical sequence without skin-tone modifiers, the tones in order)."""
    seq = canonical(sequence)
    tones = tuple(SKIN_TONES[c] for c in seq if c in SKIN_TONES)
    return "".join(c for c in seq if c not in SKIN_TONES), tones


def normalise(name: str) -> str:
    """Lower-case ASCII words joined by '-', keeping '#' and '*' (keycaps): the join key for file names."""
    text = unicodedata.normalize("NFKD", name.strip(":").lower()).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9#*]+", "-", text).strip("-")


def clean(name: str) -> str:
    """`:man_dancing:` -> `man dancing` (colons stripped, underscores to spaces)."""
    return re.sub(r"\s+", " ", name.strip(":").replace("_", " ")).strip()


def sequence_from_hex(parts: list[str]) -> str:
    """Codepoints (hex strings) -> the sequence; subdivision flags get the CANCEL TAG some packages drop."""
    sequence = "".join(chr(int(part, 16)) for part in parts)
    has_tags = any(0xE0020 <= ord(c) <= 0xE007E for c in sequence)
    if sequence.startswith(_BLACK_FLAG) and has_tags and not sequence.endswith(_CANCEL_TAG):
        sequence += _CANCEL_TAG
    return sequence


@functools.lru_cache(maxsize=1)
def _by_canonical() -> dict[str, str]:
    """Canonical sequence -> the emoji package's key (fully qualified preferred)."""
    index: dict[str, str] = {}
    for key, data in emoji.EMOJI_DATA.items():
        canon = canonical(key)
        if canon not in index or data.get("status") == emoji.STATUS["fully_qualified"]:
            index[canon] = key
    return index


def _is_flag(sequence: str) -> bool:
    return (len(sequence) == 2 and all(ord(c) in _REGIONAL for c in sequence)) or (
        sequence.startswith(_BLACK_FLAG) and sequence.endswith(_CANCEL_TAG) and len(sequence) > 2
    )


def describe(sequence: str) -> EmojiName | None:
    """Name an emoji sequence (None when the `emoji` package does not know it)."""
    key = _by_canonical().get(canonical(sequence))
    if key is None:
        return None
    base, tones = split_tones(key)
    base_key = _by_canonical().get(base)
    if tones and base_key is not None:
        concept = clean(emoji.EMOJI_DATA[base_key]["en"])
    else:
        concept = clean(_TONE_PHRASE.sub("", emoji.EMOJI_DATA[key]["en"].strip(":")))
        concept = re.sub(r" person person$", "", concept)  # "kiss: person, person, <tones>" -> "kiss"
    if _is_flag(canonical(key)):
        concept = f"flag of {concept}"
    return EmojiName(sequence=key, concept=concept, skin_tones=tones)


@functools.lru_cache(maxsize=1)
def _name_indexes() -> tuple[dict[tuple[str, tuple[str, ...]], str], ...]:
    """(normalised base name, tones) -> emoji key, from primary names, then aliases, then Unicode names."""
    primary: dict[tuple[str, tuple[str, ...]], str] = {}
    aliases: dict[tuple[str, tuple[str, ...]], str] = {}
    unicode_names: dict[tuple[str, tuple[str, ...]], str] = {}
    for key in sorted(set(_by_canonical().values())):
        named = describe(key)
        if named is None:
            continue
        tones = named.skin_tones
        primary.setdefault((normalise(named.concept), tones), key)
        base, _ = split_tones(key)
        base_key = _by_canonical().get(base, key)
        for alias in emoji.EMOJI_DATA[base_key].get("alias", []):
            aliases.setdefault((normalise(alias), tones), key)
        if len(base) == 1:
            unicode_names.setdefault((normalise(unicodedata.name(base, "")), tones), key)
    return primary, aliases, unicode_names


def lookup_name(base_name: str, tones: tuple[str, ...]) -> str | None:
    """The emoji key whose concept (normalised) is `base_name` with these skin tones, or None."""
    wanted = (normalise(base_name), tones)
    for index in _name_indexes():
        if wanted in index:
            return index[wanted]
    return None
