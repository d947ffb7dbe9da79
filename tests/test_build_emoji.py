"""`build-emoji`: real npm packages (fetched once into the user cache), 32 px, a few dozen concepts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_pipelines import emoji_names, emoji_sources
from data_pipelines.build_emoji import caption
from data_pipelines.cli import main

LIMIT = 40


def build(out: Path, *extra: str) -> None:
    args = ["build-emoji", "--out", str(out), "--size", "32", "--limit", str(LIMIT), *extra]
    assert main(args) == 0


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("emoji") / "a"
    build(out)
    return out


def read_samples(out: Path) -> dict[str, list[dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, list[dict]] = defaultdict(list)
    for shard in manifest["shards"]:
        dataset = wds.WebDataset(str(out / shard["name"]), shardshuffle=False).decode("pil")
        got = list(dataset)
        assert len(got) == shard["count"]
        samples[shard["split"]] += got
    return samples


def test_shards_read_back_with_webdataset(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    samples = read_samples(built)
    for split, items in samples.items():
        counts = manifest["counts"][split]
        assert counts["total"] == len(items) == counts["3d"] + counts["flat"]
        assert counts["3d"] == sum(s["json"]["style"] == "3d" for s in items)
        for sample in items:
            image, meta, text = sample["png"], sample["json"], sample["txt"]
            assert image.size == (32, 32) and image.mode == "RGB"
            assert meta["caption"] == text and meta["split"] == split and meta["licence"] == "MIT"
            style = {"3d": "a 3D rendered emoji of ", "flat": "a flat vector emoji of "}[meta["style"]]
            assert text.startswith(style + meta["concept"])
            assert ":" not in text and "_" not in text
            assert sample["__key__"].startswith(meta["style"] + "-")
    for shard in manifest["shards"]:
        assert hashlib.sha256((built / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    assert {s["npm"] for s in manifest["sources"]} == {"@lobehub/fluent-emoji-3d@1.1.0", "fluentui-emoji@1.3.0"}
    assert "Microsoft" in (built / "LICENSES.md").read_text()
    assert not list(built.glob("*.tmp"))


def test_images_are_flattened_on_white(built: Path) -> None:
    corners = []
    for items in read_samples(built).values():
        for sample in items:
            pixels = np.asarray(sample["png"])
            corners.append(pixels[[0, 0, -1, -1], [0, -1, 0, -1]].min())
    assert np.mean(np.asarray(corners) >= 250) > 0.8  # transparent corners became white, not black


def test_same_inputs_give_identical_files(built: Path, tmp_path: Path) -> None:
    build(tmp_path / "b")
    for name in sorted(p.name for p in built.iterdir()):
        assert (built / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_split_is_by_concept_and_stable_under_limit(built: Path, tmp_path: Path) -> None:
    samples = read_samples(built)
    concept_split = {split: {s["json"]["concept"] for s in items} for split, items in samples.items()}
    assert concept_split["train"] and concept_split["val"]
    assert not concept_split["train"] & concept_split["val"]
    styles = defaultdict(set)
    for items in samples.values():
        for s in items:
            styles[s["json"]["concept"]].add(s["json"]["style"])
    assert any(found == {"3d", "flat"} for found in styles.values())

    smaller = tmp_path / "small"
    assert main(["build-emoji", "--out", str(smaller), "--size", "32", "--limit", "10"]) == 0
    small = read_samples(smaller)
    for split, items in small.items():
        assert {s["json"]["concept"] for s in items} <= concept_split[split]


def test_captions_and_names() -> None:
    assert caption("3D rendered", "man dancing", ("medium-dark",)) == "a 3D rendered emoji of man dancing, medium-dark skin tone"
    assert caption("flat vector", "koala", ()) == "a flat vector emoji of koala"
    dancer = emoji_names.describe("\U0001f57a\U0001f3fe")
    assert dancer is not None and (dancer.concept, dancer.skin_tones) == ("man dancing", ("medium-dark",))
    assert emoji_names.lookup_name("man-dancing", ("medium-dark",)) == dancer.sequence
    england = emoji_names.sequence_from_hex("1f3f4-e0067_e0062_e0065_e006e_e0067".replace("_", "-").split("-"))
    assert emoji_names.describe(england).concept == "flag of England"
    pirate = emoji_names.sequence_from_hex(["1f3f4", "200d", "2620", "fe0f"])
    assert emoji_names.describe(pirate).concept == "pirate flag"


def test_failed_build_leaves_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    assert main(["build-emoji", "--out", str(out), "--size", "16", "--limit", "3"]) == 0
    assert (out / "manifest.json").exists()

    def broken(path: Path, size: int) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr("data_pipelines.build_emoji.render", broken)
    with pytest.raises(RuntimeError):
        main(["build-emoji", "--out", str(out), "--size", "16", "--limit", "3"])
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))


def test_missing_npm_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code = main(["build-emoji", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--limit", "2"])
    assert code == 2
    assert "npm is needed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_failed_fetch_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    bad = dataclasses.replace(emoji_sources.SOURCES["flat"], version="0.0.0-no-such-version")
    monkeypatch.setitem(emoji_sources.SOURCES, "flat", bad)
    code = main(["build-emoji", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--sources", "flat"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: `npm pack fluentui-emoji@0.0.0-no-such-version` failed")
    assert not list((tmp_path / "cache").glob("*/package"))


def test_bad_options_are_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["build-emoji", "--out", str(tmp_path), "--sources", "3d,svg"]) == 2
    assert main(["build-emoji", "--out", str(tmp_path), "--val-fraction", "1.5"]) == 2
    assert capsys.readouterr().err.count("error: ") == 2


def test_help_lists_the_commands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "build-emoji" in out and "write-shards" in out


def test_every_file_of_both_packages_is_named() -> None:
    cache = emoji_sources.default_cache_dir()
    three_d = emoji_sources.list_3d(emoji_sources.fetch(emoji_sources.SOURCES["3d"], cache), emoji_sources.SOURCES["3d"])
    flat = emoji_sources.list_flat(emoji_sources.fetch(emoji_sources.SOURCES["flat"], cache), emoji_sources.SOURCES["flat"])
    assert (len(three_d.images), len(three_d.duplicates), three_d.odd) == (3375, 16, [])
    assert (len(flat.images), flat.duplicates, flat.odd) == (3145, [], [])  # every SVG matched to a codepoint
    shared = {im.concept for im in three_d.images} & {im.concept for im in flat.images}
    assert len(shared) > 1500
    by_key = {im.key: im for im in flat.images}
    assert by_key["flat-1f621"].path.name == "pouting-face.svg"  # Microsoft's "pouting face" is U+1F621
    assert by_key["flat-1f64e"].path.name == "person-pouting-default.svg"
