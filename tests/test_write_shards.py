"""`write-shards`: folders and CSV/JSONL manifests with planted bad rows, resizing, shard limits, manifest."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.cli import main
from data_pipelines.shard_writer import ShardWriter, closed_tar_bytes


def save(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB", fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    if mode == "RGBA":
        pixels[..., 3] = 0  # fully transparent: must come out white
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def truncated(path: Path) -> None:
    data = save(path, (64, 64), fmt="JPEG")
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    jpg = save(root / "b_cat.jpg", fmt="JPEG", seed=1)
    (root / "b_cat.txt").write_text("a cat\n")
    save(root / "a_dog.png", seed=2)
    (root / "a_dog.txt").write_text("a dog")
    save(root / "sub" / "clear.png", mode="RGBA", seed=3)
    (root / "sub" / "clear.txt").write_text("nothing at all")
    truncated(root / "broken.jpg")
    (root / "broken.txt").write_text("half an image")
    save(root / "nocaption.png", seed=4)
    save(root / "blank.png", seed=5)
    (root / "blank.txt").write_text("   \n")
    (root / "notes.txt").write_text("a caption without an image is ignored")
    (root / "jpg.bytes").write_bytes(jpg)
    return root


def read(out: Path) -> dict[str, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {}
    for shard in manifest["shards"]:
        got = list(wds.WebDataset(str(out / shard["name"]), shardshuffle=False))
        assert len(got) == shard["count"]
        assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
        samples.update({s["__key__"]: s for s in got})
    return samples


def test_folder_skips_bad_files_and_summarises(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["write-shards", str(folder), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped file broken.jpg: unreadable image" in err
    assert "skipped file nocaption.png: missing caption" in err
    assert "skipped file blank.png: empty caption" in err
    assert "wrote 3 samples in 1 shards" in err and "skipped 3: empty caption 1, missing caption 1, unreadable image 1" in err
    samples = read(out)
    assert sorted(samples) == ["a_dog", "b_cat", "sub/clear"]
    assert samples["b_cat"]["jpg"] == (folder / "jpg.bytes").read_bytes()  # original bytes, not re-encoded
    assert samples["b_cat"]["txt"] == b"a cat"
    clear = np.asarray(Image.open(io.BytesIO(samples["sub/clear"]["png"])))
    assert clear.shape == (30, 40, 3) and clear.min() == 255  # transparency flattened on white
    assert json.loads(samples["a_dog"]["json"]) == {"source_file": "a_dog.png"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": {"total": 3}}
    assert [s["name"] for s in manifest["shards"]] == ["train-000000.tar"]


def test_csv_and_jsonl_manifests(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(
        "path,caption,label\n"
        "images/a_dog.png,a dog,3\n"
        f"{folder / 'b_cat.jpg'},a cat,\n"
        "images/missing.png,a ghost,1\n"
        "images/broken.jpg,half,2\n"
        "images/a_dog.png,,4\n"
        "images/a_dog.png,a dog again,x\n"
        ",no path,5\n"
    )
    out = tmp_path / "csv_out"
    assert main(["write-shards", str(csv_path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped list.csv line 4: missing file" in err
    assert "skipped list.csv line 5: unreadable image" in err
    assert "skipped list.csv line 6: empty caption" in err
    assert "skipped list.csv line 7: bad label" in err
    assert "skipped list.csv line 8: missing path" in err
    assert "wrote 2 samples" in err
    samples = read(out)
    assert sorted(samples) == ["0000000_a_dog", "0000001_b_cat"]
    assert json.loads(samples["0000000_a_dog"]["json"])["label"] == 3
    assert "label" not in json.loads(samples["0000001_b_cat"]["json"])

    jsonl = tmp_path / "list.jsonl"
    rows = [
        {"path": "images/a_dog.png", "caption": "a dog", "label": 7},
        {"path": "images/b_cat.jpg"},
        "not json {",
        {"path": "images/sub/clear.png", "caption": "clear", "label": "2"},
    ]
    jsonl.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "jsonl_out"
    assert main(["write-shards", str(jsonl), "--out", str(out), "--prefix", "val"]) == 0
    err = capsys.readouterr().err
    assert "skipped list.jsonl line 2: missing caption" in err
    assert "skipped list.jsonl line 3: bad row" in err
    samples = read(out)
    assert [json.loads(s["json"])["label"] for _, s in sorted(samples.items())] == [7, 2]
    assert json.loads((out / "manifest.json").read_text())["shards"][0]["name"] == "val-000000.tar"


def test_nothing_written_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    truncated(tmp_path / "only" / "bad.jpg")
    (tmp_path / "only" / "bad.txt").write_text("bad")
    out = tmp_path / "out"
    assert main(["write-shards", str(tmp_path / "only"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: no samples written" in err and "unreadable image 1" in err
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar*"))
    assert main(["write-shards", str(tmp_path / "nowhere"), "--out", str(out)]) == 2


def test_resize_and_center_crop(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "crop"
    assert main(["write-shards", str(folder), "--out", str(out), "--resize", "16", "--center-crop"]) == 0
    for sample in read(out).values():
        assert "jpg" not in sample and Image.open(io.BytesIO(sample["png"])).size == (16, 16)
    out = tmp_path / "resize"
    assert main(["write-shards", str(folder), "--out", str(out), "--resize", "15"]) == 0
    for sample in read(out).values():
        assert Image.open(io.BytesIO(sample["png"])).size == (20, 15)  # 40x30, shorter side 15, aspect kept


def test_shard_limits_and_merged_manifest(tmp_path: Path) -> None:
    root = tmp_path / "many"
    for i in range(7):
        save(root / f"img{i}.png", (48, 48), seed=i)  # ~7 kB each
        (root / f"img{i}.txt").write_text(f"image {i}")
    out = tmp_path / "out"
    assert main(["write-shards", str(root), "--out", str(out), "--max-samples-per-shard", "3"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 1]
    first = [s["sha256"] for s in manifest["shards"]]

    limit = 2 * 10240
    assert main(["write-shards", str(root), "--out", str(out), "--max-bytes-per-shard", str(limit), "--prefix", "val"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    val = [s for s in manifest["shards"] if s["split"] == "val"]
    assert len(val) > 1 and sum(s["count"] for s in val) == 7
    assert all((out / s["name"]).stat().st_size == s["bytes"] <= limit for s in val)
    assert [s["sha256"] for s in manifest["shards"] if s["split"] == "train"] == first  # other prefix kept
    assert manifest["counts"] == {"train": {"total": 7}, "val": {"total": 7}}

    assert main(["write-shards", str(root), "--out", str(out), "--max-samples-per-shard", "3"]) == 0
    again = json.loads((out / "manifest.json").read_text())
    assert [s["sha256"] for s in again["shards"] if s["split"] == "train"] == first  # deterministic rewrite


def test_writer_predicts_file_size_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path, "x", max_samples=100) as writer:
        offset = 0
        for i in range(5):
            key = f"{'long_' * 30}{i}"  # > 100 characters: GNU long-name headers
            entries = {"bin": rng.bytes(int(rng.integers(1, 3000))), "txt": b"caption"}
            writer.write(key, entries)
            offset += writer.sample_bytes(key, entries)
    assert (tmp_path / "x-000000.tar").stat().st_size == closed_tar_bytes(offset)
    with tarfile.open(tmp_path / "x-000000.tar") as archive:
        members = archive.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}


def test_only_recorded_shards_are_replaced_or_removed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A rerun with fewer shards removes the extra ones it recorded; shard-named files no manifest lists (another
    tool's) are refused with one line and left as they were; an interrupted run's record still counts."""
    root = tmp_path / "many"
    for i in range(7):
        save(root / f"img{i}.png", (16, 16), seed=i)
        (root / f"img{i}.txt").write_text(f"image {i}")
    out = tmp_path / "out"
    assert main(["write-shards", str(root), "--out", str(out), "--max-samples-per-shard", "3"]) == 0
    assert main(["write-shards", str(root), "--out", str(out), "--max-samples-per-shard", "7"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]  # its own extra shards removed

    (out / "train-000004.tar").write_bytes(b"someone else's")
    (out / "val-000000.tar").write_bytes(b"another prefix: not this run's business")
    capsys.readouterr()
    assert main(["write-shards", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out:") and "\n" not in err and "train-000004.tar" in err, err
    assert (out / "train-000004.tar").read_bytes() == b"someone else's"
    (out / "train-000004.tar").unlink()

    # killed after its shards were moved in but before its manifest was written: the set-aside record still counts
    (out / "manifest.json").rename(out / ".manifest-previous.json")
    assert main(["write-shards", str(root), "--out", str(out), "--max-samples-per-shard", "3"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                                          "val-000000.tar"]
    assert not (out / ".manifest-previous.json").exists()
