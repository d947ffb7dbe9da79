"""Ordinary user mistakes (issue 17), run from the command line in driver subprocesses: exit 2, exactly one
`error:` line naming the argument or file and the fix, no traceback, no new file. Every command: fit, sample, evaluate, compare, pipeline, sweep,
encode-latents, build-emoji, write-shards.

The cases run in two driver subprocesses at once (tests/user_error_driver.py: the command lines one after the
other, each with its own working folder and captured stderr, so Python and torch start twice, not 60 times); one
test per case then checks its result. Read-only folders are made with chmod 555; as root (who may write anywhere)
those cases are skipped. Valid inputs that used to be refused (a CSV with a byte-order mark, sample keys with
spaces or non-ASCII letters) and writes that fail half-way (a full disk) are checked in-process at the end.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from test_bad_configs import REPO, Env, Files, files  # noqa: F401 - `files` is the shared checkpoint fixture

pytestmark = pytest.mark.timeout(600)
GPU = torch.cuda.is_available()
ROOT = "root writes into read-only folders (and `nobody` cannot run this venv's python)" if os.geteuid() == 0 else None


@dataclass
class Case:
    name: str
    args: Callable[[Env], list[str]]
    key: str  # the argument or file the message must name
    fix: str  # a piece of the fix the message must give
    entry: str = "lightning_diffusion"  # or data_pipelines
    skip: str | None = None


def png(env: Env, name: str = "low.png") -> str:
    path = env.tmp / name
    Image.new("RGB", (8, 8), (200, 30, 40)).save(path)
    return str(path)


def blocker(env: Env) -> Path:
    """An existing file where the command needs a folder."""
    path = env.tmp / "blocker"
    path.write_text("not a folder\n")
    return path


def folder(env: Env, name: str) -> Path:
    path = env.tmp / name
    path.mkdir()
    return path


def read_only(env: Env) -> Path:
    folder = env.tmp / "locked"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    return folder


def manifest(env: Env, name: str, text: bytes) -> str:
    path = env.tmp / name
    path.write_bytes(text)
    return str(path)


def encode(env: Env, *extra: str) -> list[str]:
    return ["encode-latents", "--vae", str(env.files.vae), "--in", env.files.shards, "--num-workers", "0",
            *(extra if "--out" in extra else ("--out", str(env.out), *extra))]


def write_shards(env: Env, *extra: str) -> list[str]:
    source = env.tmp / "images"
    source.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(source / "a.png")
    (source / "a.txt").write_text("a caption")
    return ["write-shards", str(source), *(extra if "--out" in extra else ("--out", str(env.out), *extra))]


def denoiser(env: Env, **model: object) -> list[str]:
    return env.fit("denoiser", model=model)


NO_GPU = "this machine has a CUDA GPU" if GPU else None
CASES = [
    # ---- sample: devices, numbers, outputs, conditions
    Case("sample cuda without a GPU", lambda e: e.sample(e.files.flow_denoiser, "--device", "cuda"), "--device",
         "use cpu", skip=NO_GPU),
    Case("sample device index past the GPUs", lambda e: e.sample(e.files.flow_denoiser, "--device", "cuda:99"),
         "--device", "cpu"),
    Case("sample unknown device name", lambda e: e.sample(e.files.flow_denoiser, "--device", "gpu"), "--device",
         "use auto, cpu"),
    Case("sample guidance nan", lambda e: e.sample(e.files.flow_denoiser, "--guidance", "nan"), "--guidance",
         "finite"),
    Case("sample guidance inf", lambda e: e.sample(e.files.flow_denoiser, "--guidance", "inf"), "--guidance",
         "finite"),
    Case("sample guidance not a number", lambda e: e.sample(e.files.flow_denoiser, "--guidance", "strong"),
         "--guidance", "not a number"),
    Case("sample zero steps", lambda e: e.sample(e.files.flow_denoiser, "--steps", "0"), "--steps", "at least 1"),
    Case("sample negative n", lambda e: e.sample(e.files.flow_denoiser, "--n", "-2"), "--n", "at least 1"),
    Case("sample negative label", lambda e: e.sample(e.files.flow_denoiser, "--label", "-1"), "--label",
         "0 or more"),
    Case("sample seed not a whole number", lambda e: e.sample(e.files.flow_denoiser, "--seed", "1.5"), "--seed",
         "--help"),
    Case("sample unknown sampler", lambda e: e.sample(e.files.flow_denoiser, "--sampler", "plms"), "--sampler",
         "choose from"),
    Case("sample unknown option", lambda e: e.sample(e.files.flow_denoiser, "--seeds", "3"), "--seeds", "--help"),
    Case("sample grid without an image suffix", lambda e: [*e.sample(e.files.flow_denoiser), "--out",
                                                          str(e.out / "grid")], "--out", "grid.png"),
    Case("sample out is a folder", lambda e: [*e.sample(e.files.flow_denoiser), "--out", str(folder(e, "x.png"))],
         "--out", "give a file name"),
    Case("sample out under an existing file", lambda e: [*e.sample(e.files.flow_denoiser), "--out",
                                                        str(blocker(e) / "grid.png")], "blocker", "not a folder"),
    Case("sample out in a read-only folder", lambda e: [*e.sample(e.files.flow_denoiser), "--out",
                                                       str(read_only(e) / "grid.png")], "--out", "not writable",
         skip=ROOT),
    Case("sample lowres on a model without low-res input", lambda e: e.sample(
        e.files.flow_denoiser, "--lowres", png(e)), "--lowres", "leave out --lowres"),
    Case("sample missing lowres image", lambda e: e.sample(e.files.flow_denoiser, "--lowres", str(e.tmp / "no.png")),
         "no.png", "does not exist"),
    # ---- evaluate
    Case("evaluate cuda without a GPU", lambda e: [*e.evaluate(e.files.vae), "--device", "cuda"], "--device",
         "use cpu", skip=NO_GPU),
    Case("evaluate unknown device name", lambda e: [*e.evaluate(e.files.vae), "--device", "gpu:0"], "--device",
         "cpu"),
    Case("evaluate zero batch size", lambda e: e.evaluate(e.files.vae, "--batch-size", "0"), "--batch-size",
         "at least 1"),
    Case("evaluate zero kid subset", lambda e: e.evaluate(e.files.vae, "--kid-subset-size", "0"),
         "--kid-subset-size", "at least 1"),
    Case("evaluate image size the VAE cannot take", lambda e: e.evaluate(e.files.vae, "--image-size", "15"),
         "--image-size", "multiple of 2"),
    Case("evaluate zero image size", lambda e: e.evaluate(e.files.vae, "--image-size", "0"), "--image-size",
         "at least 1"),
    Case("evaluate guidance nan", lambda e: e.evaluate(e.files.flow_denoiser, "--metrics", "fid", "--guidance",
                                                       "nan"), "--guidance", "finite"),
    Case("evaluate negative workers", lambda e: e.evaluate(e.files.vae, "--num-workers", "-1"), "--num-workers",
         "0 or more"),
    Case("evaluate zero steps", lambda e: e.evaluate(e.files.flow_denoiser, "--metrics", "fid", "--steps", "0"),
         "--steps", "at least 1"),
    Case("evaluate out without .json", lambda e: [*e.evaluate(e.files.vae), "--out", str(e.out / "result.txt")],
         "--out", ".json"),
    Case("evaluate out under an existing file", lambda e: [*e.evaluate(e.files.vae), "--out",
                                                          str(blocker(e) / "r.json")], "blocker", "not a folder"),
    Case("evaluate out in a read-only folder", lambda e: [*e.evaluate(e.files.vae), "--out",
                                                         str(read_only(e) / "r.json")], "--out", "not writable",
         skip=ROOT),
    # ---- encode-latents (both entries)
    Case("encode-latents cuda without a GPU", lambda e: encode(e, "--device", "cuda"), "--device", "use cpu",
         skip=NO_GPU),
    Case("encode-latents unknown device name", lambda e: encode(e, "--device", "cuda:x"), "--device", "cpu",
         entry="data_pipelines"),
    Case("encode-latents zero image size", lambda e: encode(e, "--image-size", "0"), "--image-size", "at least 1"),
    Case("encode-latents zero batch size", lambda e: encode(e, "--batch-size", "0"), "--batch-size", "at least 1"),
    Case("encode-latents zero shard size", lambda e: encode(e, "--max-samples-per-shard", "0"),
         "--max-samples-per-shard", "at least 1", entry="data_pipelines"),
    Case("encode-latents prefix with a dot", lambda e: encode(e, "--prefix", "train.v2"), "--prefix", "e.g."),
    Case("encode-latents out is a file", lambda e: encode(e, "--out", str(blocker(e))), "--out", "choose a folder"),
    Case("encode-latents out in a read-only folder", lambda e: encode(e, "--out", str(read_only(e) / "latents")),
         "--out", "not writable", skip=ROOT),
    # ---- write-shards and build-emoji (python -m data_pipelines)
    Case("write-shards csv not utf-8", lambda e: ["write-shards", manifest(e, "rows.csv", "path,caption\na.png,caf\xe9\n"
                                                                          .encode("latin-1")), "--out", str(e.out)],
         "rows.csv", "save the manifest as UTF-8", entry="data_pipelines"),
    Case("write-shards jsonl not utf-8", lambda e: ["write-shards", manifest(
        e, "rows.jsonl", '{"path": "a.png", "caption": "caf\xe9"}\n'.encode("cp1252")), "--out", str(e.out)],
         "rows.jsonl", "UTF-8", entry="data_pipelines"),
    Case("write-shards out is a file", lambda e: write_shards(e, "--out", str(blocker(e))), "--out",
         "choose a folder", entry="data_pipelines"),
    Case("write-shards out in a read-only folder", lambda e: write_shards(e, "--out", str(read_only(e) / "shards")),
         "--out", "not writable", entry="data_pipelines", skip=ROOT),
    Case("write-shards zero resize", lambda e: write_shards(e, "--resize", "0"), "--resize", "at least 1",
         entry="data_pipelines"),
    Case("write-shards shard bytes not a number", lambda e: write_shards(e, "--max-bytes-per-shard", "lots"),
         "--max-bytes-per-shard", "whole number", entry="data_pipelines"),
    Case("build-emoji out is a file", lambda e: ["build-emoji", "--out", str(blocker(e))], "--out",
         "choose a folder", entry="data_pipelines"),
    Case("build-emoji val fraction nan", lambda e: ["build-emoji", "--out", str(e.out), "--val-fraction", "nan"],
         "--val-fraction", "[0, 1)", entry="data_pipelines"),
    Case("unknown data_pipelines command", lambda e: ["write-shard", "x"], "write-shard", "--help",
         entry="data_pipelines"),
    # ---- fit: values torch or Lightning would refuse late
    Case("fit vae adam beta of 1", lambda e: e.fit("vae", model={"betas": [0.5, 1.0]}), "model.betas", "e.g."),
    Case("fit negative seed", lambda e: e.fit("vae", "--seed_everything", "-1"), "seed_everything", "2**32 - 1"),
    Case("fit clip adam beta nan", lambda e: e.fit("clip", model={"betas": [float("nan"), 0.98]}), "model.betas",
         "e.g."),
    Case("fit clip negative weight decay", lambda e: e.fit("clip", model={"weight_decay": -0.1}),
         "model.weight_decay", "e.g."),
    Case("fit vae dropout of 1", lambda e: e.fit("vae", model={"dropout": 1.0}), "model.dropout", "e.g."),
    Case("fit denoiser dropout above 1", lambda e: denoiser(e, dropout=1.5), "model.dropout", "e.g."),
    Case("fit denoiser ema decay above 1", lambda e: denoiser(e, ema_decay=1.01), "model.ema_decay", "e.g."),
    Case("fit denoiser heads do not divide the width", lambda e: denoiser(e, num_heads=3), "model.num_heads",
         "divisor"),
    Case("fit denoiser negative weight decay", lambda e: denoiser(e, weight_decay=-0.01), "model.weight_decay",
         "e.g."),
    Case("fit denoiser negative warm-up", lambda e: denoiser(e, warmup_steps=-10), "model.warmup_steps", "e.g."),
    Case("fit val_check_interval longer than the epoch", lambda e: e.fit("vae", trainer={"val_check_interval": 1000}),
         "val_check_interval", "trainer"),
    Case("fit precision whose plugin is not installed", lambda e: e.fit("vae", trainer={"precision": "transformer-engine"}),
         "precision", "trainer"),
    Case("fit config file that is not valid YAML", lambda e: ["fit", "--config", str(e.write(
        "broken.yaml", "model:\n  class_path: lightning_diffusion.autoencoder.VAEGAN\n  init_args: {image_size: 16\n"))],
         "broken.yaml", "fix the YAML"),
    # ---- pipeline, sweep, compare
    Case("pipeline preset extends itself", lambda e: e.pipeline("--preset", str(e.write("loop.yaml", {
        "extends": "loop.yaml", "image_size": 16}))), "loop.yaml", "extends"),
    Case("pipeline preset is a list", lambda e: e.pipeline("--preset", str(e.write("list.yaml", "- a\n- b\n"))),
         "list.yaml", "not a mapping"),
    Case("pipeline preset not valid YAML", lambda e: e.pipeline("--preset", str(e.write("bad.yaml", "a: [1, 2\n"))),
         "bad.yaml", "fix the file"),
    Case("pipeline unknown force stage", lambda e: e.pipeline("--force", "vae"), "--force", "choose from"),
    Case("sweep file is a list", lambda e: ["sweep", str(e.write("sweep.yaml", "- 1\n")), "--dry-run", "--out",
                                            str(e.out)], "sweep.yaml", "mapping"),
    Case("sweep submit and dry-run together", lambda e: ["sweep", str(e.write("sweep.yaml", "{}\n")), "--dry-run",
                                                         "--submit"], "--submit", "--help"),
    Case("compare out is a file", lambda e: ["compare", str(e.tmp), "--out", str(blocker(e))], "--out",
         "choose a folder"),
]


def _snapshot(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def _run_group(group: list[tuple[Case, Path]], files: Files, home: Path) -> list[tuple[int, str, set[Path]] | Exception]:
    """One driver subprocess runs the group's cases one after the other (see tests/user_error_driver.py)."""
    prepared, outcomes = [], []
    for case, folder in group:
        try:
            prepared.append((case.entry, case.args(Env(folder, files)), str(folder)))
        except Exception as err:  # reported by the case's own test
            prepared.append(err)
    befores = [_snapshot(folder) for _, folder in group]
    environ = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)), "HOME": str(home),
               "XDG_CACHE_HOME": str(home / ".cache"), "MPLCONFIGDIR": str(home / "matplotlib")}
    runnable = [item for item in prepared if not isinstance(item, Exception)]
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("user_error_driver.py"))],
                            input=json.dumps(runnable), cwd=home, env=environ, capture_output=True, text=True,
                            timeout=900)
    if result.returncode != 0:
        return [RuntimeError(f"the driver failed: {result.stderr[-2000:]}")] * len(group)
    answers = iter(json.loads(result.stdout.strip().splitlines()[-1]))
    for item, (_, folder), before in zip(prepared, group, befores):
        if isinstance(item, Exception):
            outcomes.append(item)
        else:
            code, err = next(answers)
            outcomes.append((code, err, _snapshot(folder) - before))
    return outcomes


@pytest.fixture(scope="session")
def results(files: Files, tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> dict[str, tuple[int, str, set[Path]] | BaseException]:
    """The (exit code, stderr, new files) of every selected case: two driver subprocesses, half the cases each."""
    selected = {item.callspec.params["case"].name for item in request.session.items
                if isinstance(getattr(item, "callspec", None) and item.callspec.params.get("case"), Case)}
    runnable = [case for case in CASES if case.skip is None and case.name in selected]
    pairs = [(case, tmp_path_factory.mktemp(re.sub(r"\W+", "_", case.name))) for case in runnable]
    home = tmp_path_factory.mktemp("home")  # caches (matplotlib's font list) shared by the cases, outside their folders
    shared_before = _snapshot(files.root)
    groups = [pairs[0::2], pairs[1::2]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        grouped = list(pool.map(lambda group: _run_group(group, files, home), groups))
    outcomes = {case.name: outcome for group, answers in zip(groups, grouped) for (case, _), outcome in zip(group, answers)}
    outcomes["__shared__"] = _snapshot(files.root) - shared_before
    return outcomes


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_user_mistake_is_one_line_exit_2_and_writes_nothing(case: Case, results) -> None:
    if case.skip is not None:
        pytest.skip(case.skip)
    if isinstance(results[case.name], BaseException):
        raise results[case.name]
    code, err, new_files = results[case.name]
    assert not results["__shared__"], f"a refused command wrote {results['__shared__']} beside the checkpoints"
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.key in lines[0], f"the message does not name {case.key!r}: {lines[0]}"
    assert case.fix in lines[0], f"the message does not say the fix ({case.fix!r}): {lines[0]}"
    assert not new_files, f"a refused command wrote {sorted(map(str, new_files))}"


def test_the_table_covers_every_command() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)) >= 50
    for command in ("fit", "sample", "evaluate", "compare", "pipeline", "sweep", "encode-latents", "write-shards",
                    "build-emoji"):
        assert any(name.startswith(command) for name in names), command


# ---------------------------------------------------------------- in-process: valid inputs work, failed writes leave nothing

def _main(argv: list[str], entry: str, capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    if entry == "data_pipelines":
        from data_pipelines.cli import main
    else:
        from lightning_diffusion.cli import main
    capfd.readouterr()
    code = main(argv)
    return code, capfd.readouterr().err


def _shard_members(pattern: str) -> dict[str, dict[str, bytes]]:
    import glob
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(glob.glob(pattern)):
        with tarfile.open(shard) as archive:
            for member in archive:
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return samples


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path, capfd) -> None:
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    rows = tmp_path / "rows.csv"
    rows.write_bytes("path,caption\na.png,un caf\xe9\n".encode("utf-8-sig"))
    code, err = _main(["write-shards", str(rows), "--out", str(tmp_path / "out")], "data_pipelines", capfd)
    assert code == 0, err
    samples = _shard_members(str(tmp_path / "out" / "train-*.tar"))
    assert [sample["txt"].decode() for sample in samples.values()] == ["un caf\xe9"]


def test_encode_latents_keeps_keys_with_spaces_and_non_ascii_letters(files: Files, tmp_path, capfd) -> None:
    from malformed_support import good_sample, write_tar

    keys = ["koala 1", "caf\xe9_2", "\u732b/3"]
    samples = [{**good_sample(index), "__key__": key} for index, key in enumerate(keys)]
    shard = write_tar(tmp_path / "in-000000.tar", samples)
    out = tmp_path / "latents"
    code, err = _main(["encode-latents", "--vae", str(files.vae), "--in", str(shard), "--out", str(out),
                       "--num-workers", "0", "--device", "cpu", "--image-size", "8"], "lightning_diffusion", capfd)
    assert code == 0, err
    written = _shard_members(str(out / "train-*.tar"))
    assert sorted(written) == sorted(keys)
    assert all(written[key]["txt"].decode() == f"caption {index}" for index, key in enumerate(keys))
    assert json.loads((out / "manifest.json").read_text())["counts"]["train"]["total"] == 3


def _assert_one_error_line(code: int, err: str, text: str) -> None:
    """In-process, progress bars share stderr: the error is the one `error:` line, the last, with no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert [line for line in lines if "error:" in line] == lines[-1:] and text in lines[-1], err


def _disk_full_after(calls: int, function: Callable) -> Callable:
    count = {"n": 0}

    def failing(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "the output file")
        return function(*args, **kwargs)

    return failing


def test_a_full_disk_while_sampling_leaves_the_previous_outputs(files: Files, tmp_path, monkeypatch, capfd) -> None:
    from lightning_diffusion.commands import sample

    out = tmp_path / "grid.png"
    argv = ["sample", "--ckpt", str(files.flow_denoiser), "--steps", "2", "--n", "2", "--device", "cpu",
            "--out", str(out)]
    assert _main(argv, "lightning_diffusion", capfd)[0] == 0
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    monkeypatch.setattr(sample, "save_png", _disk_full_after(1, sample.save_png))
    code, err = _main([*argv, "--seed", "5"], "lightning_diffusion", capfd)
    _assert_one_error_line(code, err, "No space left on device")
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_a_full_disk_while_writing_shards_leaves_the_previous_shards(tmp_path, monkeypatch, capfd) -> None:
    import webdataset

    source = tmp_path / "images"
    source.mkdir()
    for index in range(3):
        Image.new("RGB", (8, 8), (index, 2, 3)).save(source / f"a{index}.png")
        (source / f"a{index}.txt").write_text(f"caption {index}")
    argv = ["write-shards", str(source), "--out", str(tmp_path / "out"), "--max-samples-per-shard", "1"]
    assert _main(argv, "data_pipelines", capfd)[0] == 0
    before = {path: path.read_bytes() for path in (tmp_path / "out").rglob("*")}
    monkeypatch.setattr(webdataset.TarWriter, "write", _disk_full_after(2, webdataset.TarWriter.write))
    code, err = _main([*argv, "--resize", "4"], "data_pipelines", capfd)
    _assert_one_error_line(code, err, "No space left on device")
    assert {path: path.read_bytes() for path in (tmp_path / "out").rglob("*")} == before
