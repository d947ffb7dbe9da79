"""Exact resume: a run SIGKILLed at random steps and restarted with the same command trains on the same samples
(by key, in the same order) to the same weights as an uninterrupted run; the DataModule's position round-trips at
every batch (workers 0/2/3, exhaustive and resampled); checkpoint writes are atomic and only the last k are kept.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from data_pipelines import ShardDataModule
from lightning_diffusion.training.resume import AtomicCheckpointIO, ResumeCheckpoint, atomic_save, prune, step_checkpoints

from test_datamodule import write_shards

REPO = Path(__file__).resolve().parents[1]

SHARDS = [37, 23, 41, 30, 29]  # 160 samples -> 20 batches of 8 per epoch


def fit_config(tmp_path: Path, num_workers: int) -> Path:
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 2, "deterministic": True, "precision": "32-true",
            "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {"class_path": "resume_support.RecordAndKill"},
                {"class_path": "lightning_diffusion.training.resume.ResumeCheckpoint",
                 "init_args": {"every_n_train_steps": 3, "keep_last": 2}},
            ],
        },
        "model": {"class_path": "resume_support.TinyRegressor"},
        "data": {"class_path": "data_pipelines.ShardDataModule", "init_args": {
            "train_urls": str(tmp_path / "shards" / "train-*.tar"), "image_size": 8, "batch_size": 8,
            "num_workers": num_workers, "shuffle_buffer": 16, "seed": 11, "random_flip": True}},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, folder: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
           "RESUME_TEST_LOG": str(folder / "steps.jsonl"), "RESUME_TEST_WEIGHTS": str(folder / "final.pt"),
           "RESUME_TEST_KILL_AT": str(kill_at if kill_at is not None else -1)}
    command = [sys.executable, "-m", "lightning_diffusion", "fit", "--config", str(config),
               "--trainer.default_root_dir", str(folder)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def steps(folder: Path) -> dict[int, list[list[str]]]:
    """step -> the keys trained at that step, once per time it was trained (a step after the last checkpoint of
    a killed run is trained again after the restart)."""
    trained: dict[int, list[list[str]]] = {}
    for line in (folder / "steps.jsonl").read_text().splitlines():
        record = json.loads(line)
        trained.setdefault(record["step"], []).append(record["keys"])
    return trained


@pytest.mark.slow
def test_killed_and_restarted_run_matches_uninterrupted(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", SHARDS)
    config = fit_config(tmp_path, num_workers=2)
    whole = tmp_path / "whole"
    result = fit(config, whole)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = steps(whole)
    total = len(expected)
    assert total == 40 and all(len(keys) == 1 for keys in expected.values())

    kills = sorted(random.Random(9).sample(range(1, total), 5))  # 5 distinct steps over both epochs (20 each)
    assert kills[0] < 20 < kills[-1]
    killed = tmp_path / "killed"
    for kill_at in kills:
        result = fit(config, killed, kill_at)
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        assert len(step_checkpoints(killed / "resume")) <= 2
    result = fit(config, killed)
    assert result.returncode == 0, result.stderr[-3000:]

    trained = steps(killed)
    assert sorted(trained) == sorted(expected)  # every step trained, no step skipped
    for step, runs in trained.items():
        assert all(keys == expected[step][0] for keys in runs), f"step {step} saw other samples after a restart"
    redone = sum(len(runs) - 1 for runs in trained.values())
    assert redone > 0  # some kills fell between checkpoints: those steps were trained again, on the same samples
    for epoch in (0, 1):  # each epoch: every sample once, none twice
        keys = [key for step in range(20 * epoch + 1, 20 * epoch + 21) for key in expected[step][0]]
        assert len(keys) == len(set(keys)) == 160

    final, reference = torch.load(killed / "final.pt"), torch.load(whole / "final.pt")
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], reference[name]) for name in reference)


# ------------------------------------------------------------------------------------ the DataModule's position

@pytest.mark.parametrize(("num_workers", "mode"), [(0, "exhaustive"), (2, "exhaustive"), (3, "resampled")])
def test_datamodule_position_round_trips_at_every_batch(tmp_path: Path, num_workers: int, mode: str) -> None:
    write_shards(tmp_path, [13, 9, 17, 6])
    options = dict(image_size=8, batch_size=3, num_workers=num_workers, shuffle_buffer=7, seed=5, random_flip=True,
                   persistent_workers=False)
    if mode == "resampled":
        options.update(mode="resampled", samples_per_epoch=40)

    def make() -> ShardDataModule:
        dm = ShardDataModule(str(tmp_path / "train-*.tar"), **options)
        dm.setup("fit")
        dm.set_epoch(1)
        return dm

    whole = [(batch["key"], batch["image"]) for batch in make().train_dataloader()]
    assert len(whole) >= 10
    for cut in range(len(whole)):
        first = make()
        batches = iter(first.train_dataloader())
        seen = [next(batches)["key"] for _ in range(cut)]
        state = first.state_dict()
        del batches
        second = make()
        second.load_state_dict(state)
        rest = list(second.train_dataloader())
        assert seen + [batch["key"] for batch in rest] == [keys for keys, _ in whole], f"cut after {cut} batches"
        for batch, (_, image) in zip(rest, whole[cut:]):
            assert torch.equal(batch["image"], image)  # same decoding and the same (per-key) flips


def test_position_from_another_layout_restarts_the_epoch(tmp_path: Path) -> None:
    write_shards(tmp_path, [13, 9, 17, 6])
    options = dict(image_size=8, batch_size=3, num_workers=0, shuffle_buffer=7, seed=5)
    first = ShardDataModule(str(tmp_path / "train-*.tar"), **options)
    first.setup("fit")
    batches = iter(first.train_dataloader())
    next(batches)
    state = first.state_dict()
    second = ShardDataModule(str(tmp_path / "train-*.tar"), **{**options, "batch_size": 4})
    second.setup("fit")
    second.load_state_dict(state)
    with pytest.warns(UserWarning, match="another layout"):
        loader = second.train_dataloader()
    assert len(list(loader)) == len(loader)


def _two_rank_resume(rank: int, directory: str, port: int, results: str) -> None:
    """One of 2 gloo ranks: stop after 3 batches, save (positions gathered from both ranks), resume, compare."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    options = dict(image_size=8, batch_size=3, num_workers=0, shuffle_buffer=7, seed=5)

    def make() -> ShardDataModule:
        dm = ShardDataModule(str(Path(directory) / "train-*.tar"), **options)
        dm._rank_world = lambda: (rank, 2)
        dm.setup("fit")
        return dm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = [batch["key"] for batch in make().train_dataloader()]
        first = make()
        batches = iter(first.train_dataloader())
        seen = [next(batches)["key"] for _ in range(3)]
        state = first.state_dict()
        second = make()
        second.load_state_dict(state)
        rest = [batch["key"] for batch in second.train_dataloader()]
    Path(results, f"rank{rank}.json").write_text(json.dumps(
        {"positions": state["train_positions"], "resumed": seen + rest, "whole": whole}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_resumes_from_its_own_position(tmp_path: Path) -> None:
    """Positions are gathered from all ranks; a corrupt sample on rank 1 makes its raw count differ from rank 0's."""
    import socket

    import torch.multiprocessing as mp

    write_shards(tmp_path, [13, 9, 17, 6])
    probe = ShardDataModule(str(tmp_path / "train-*.tar"), image_size=8, batch_size=3, num_workers=0, shuffle_buffer=7,
                            seed=5)
    probe._rank_world = lambda: (1, 2)
    probe.setup("fit")
    bad = next(iter(probe.train_dataloader()))["key"][0]  # corrupt it: rank 1 pulls one more raw sample than rank 0
    write_shards(tmp_path, [13, 9, 17, 6],
                 extra=lambda shard, index: {"png": b"broken"} if bad == f"train{shard}_{index:03d}" else {})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_two_rank_resume, args=(str(tmp_path), port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["positions"] == ranks[1]["positions"] and len(ranks[0]["positions"]) == 2
    raw = [ranks[0]["positions"][rank]["workers"][0][0] for rank in range(2)]
    assert raw[1] == raw[0] + 1  # rank 1 pulled the corrupt sample as well
    for rank in ranks:
        assert rank["resumed"] == rank["whole"]


# ------------------------------------------------------------------------------------ atomic writes, keep-last-k

def test_crash_mid_write_leaves_the_previous_checkpoint_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "step-000000003.ckpt"
    atomic_save({"weights": torch.arange(4)}, path)

    def dies_half_way(obj: object, file) -> None:  # noqa: ANN001 - a file object
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # stands for the process dying mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file is gone too


def test_sigkill_mid_write_leaves_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save({"weights": torch.arange(4)}, path)
    script = ("import os, signal, torch; from lightning_diffusion.training.resume import atomic_save\n"
              "def dies(obj, file):\n    file.write(b'half'); file.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
              f"torch.save = dies; atomic_save({{'weights': torch.zeros(4)}}, {str(path)!r})\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir())[0].startswith(".last.ckpt.tmp-")  # a stray, never the real one


def test_prune_keeps_the_last_k_and_drops_an_abandoned_future(tmp_path: Path) -> None:
    for step in (3, 6, 9, 12, 30):
        (tmp_path / f"step-{step:09d}.ckpt").write_bytes(b"x")
    (tmp_path / "last.ckpt").write_bytes(b"x")
    prune(tmp_path, 12, keep_last=2)
    assert sorted(step_checkpoints(tmp_path)) == [9, 12]
    assert (tmp_path / "last.ckpt").exists()  # not ours


def test_resume_checkpoint_rejects_bad_settings() -> None:
    from lightning_diffusion.errors import UserError

    for bad in ({"every_n_train_steps": 0}, {"keep_last": 0}, {"keep_last": True}):
        with pytest.raises(UserError, match="positive integer"):
            ResumeCheckpoint(**bad)


def test_auto_resume_picks_the_newest_step_file_unless_a_slurm_checkpoint_is_newer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from lightning_diffusion.training.resume import auto_resume_path

    def trainer(**options: object) -> L.Trainer:
        return L.Trainer(default_root_dir=tmp_path, callbacks=[ResumeCheckpoint(**options)], logger=False,
                         enable_progress_bar=False, enable_model_summary=False)

    assert auto_resume_path(trainer()) is None  # a fresh start
    for step, age in ((4, 30), (8, 20)):
        path = tmp_path / "resume" / f"step-{step:09d}.ckpt"
        atomic_save({"step": step}, path)
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime - age))
    assert auto_resume_path(trainer()) == str(tmp_path / "resume" / "step-000000008.ckpt")
    assert auto_resume_path(trainer(auto_resume=False)) is None
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    atomic_save({}, hpc)
    monkeypatch.setattr(SLURMEnvironment, "detect", staticmethod(lambda: True))
    assert auto_resume_path(trainer()) is None  # Lightning restores the newer hpc_ckpt itself
    os.utime(hpc, (hpc.stat().st_atime, hpc.stat().st_mtime - 60))
    assert auto_resume_path(trainer()) == str(tmp_path / "resume" / "step-000000008.ckpt")
