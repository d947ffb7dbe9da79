"""`pipeline`: presets (extends, overrides), stage bookkeeping (done markers, skips, failures, --force), and the
smoke chain end to end on a tiny emoji build (slow: every stage is a real subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_diffusion.cli import main
from lightning_diffusion.commands.pipeline import Pipeline, StageFailed, checkpoint_callbacks, cli_value
from lightning_diffusion.commands.pipeline_presets import STAGES, apply_override, load_preset
from lightning_diffusion.errors import UserError


def test_smoke_extends_quickstart_and_overrides_land_where_they_belong() -> None:
    quick, smoke = load_preset("quickstart"), load_preset("smoke")
    assert "extends" not in smoke and smoke["image_size"] == quick["image_size"]
    assert smoke["stages"]["denoiser"]["config"] == quick["stages"]["denoiser"]["config"]
    assert smoke["stages"]["denoiser"]["overrides"]["trainer.max_steps"] < quick["stages"]["denoiser"]["overrides"][
        "trainer.max_steps"]
    assert smoke["stages"]["denoiser"]["overrides"]["model.init_args.channel_mult"] == [1, 2]  # inherited
    apply_override(smoke, "denoiser.trainer.max_steps=7")
    apply_override(smoke, "evaluate.num_samples=5")
    apply_override(smoke, "data.limit=30")
    apply_override(smoke, "vae_gan.model.init_args.betas=[0.5, 0.99]")
    assert smoke["stages"]["denoiser"]["overrides"]["trainer.max_steps"] == 7
    assert smoke["stages"]["evaluate"]["num_samples"] == 5 and smoke["data"]["limit"] == 30
    assert smoke["stages"]["vae_gan"]["overrides"]["model.init_args.betas"] == [0.5, 0.99]
    with pytest.raises(UserError, match="STAGE.KEY=VALUE"):
        apply_override(smoke, "denoiser.trainer.max_steps")
    with pytest.raises(UserError, match="--preset"):
        load_preset("no_such_preset")


def test_checkpoint_callbacks_leave_every_model_checkpoint_in_the_stage_folder() -> None:
    config = {"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "runs/x", "monitor": "m"}},
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
    ]}}
    callbacks = checkpoint_callbacks(config)
    # no dirpath: the CLI writes them to <default_root_dir>/checkpoints, the stage folder
    assert callbacks[0]["init_args"] == {"monitor": "m", "save_last": False, "enable_version_counter": False}
    assert callbacks[1] == config["trainer"]["callbacks"][1] and config["trainer"]["callbacks"][0]["init_args"][
        "dirpath"] == "runs/x"  # the config itself is not changed
    assert callbacks[2]["init_args"] == {"save_last": True, "save_top_k": 0,
                                         "enable_version_counter": False}  # last.ckpt = the final weights
    assert checkpoint_callbacks({})[0]["init_args"] == callbacks[2]["init_args"]
    unmonitored = {"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                              "init_args": {"save_top_k": 0}}]}}
    assert [c["init_args"]["save_last"] for c in checkpoint_callbacks(unmonitored)] == [True]


def test_last_checkpoint_holds_the_final_step_when_the_last_validation_is_not_the_best(tmp_path: Path) -> None:
    """Lightning 2.6 skips `last.ckpt` of a monitored ModelCheckpoint when the validation is not a new best; the
    callbacks the pipeline builds must still leave the final weights in `last.ckpt`."""
    import importlib

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Worsening(BoringModel):
        def validation_step(self, batch, batch_idx):  # val/loss rises: only the first validation is the best
            self.log("val/loss", float(self.global_step))

    config = {"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "filename": "best", "monitor": "val/loss", "mode": "min", "save_top_k": 1, "save_last": True}}]}}
    callbacks = []
    for spec in checkpoint_callbacks(config):
        module, _, name = spec["class_path"].rpartition(".")
        callbacks.append(getattr(importlib.import_module(module), name)(**spec.get("init_args", {})))
    trainer = pl.Trainer(max_steps=6, val_check_interval=2, limit_val_batches=1, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Worsening())
    load = lambda name: torch.load(tmp_path / "checkpoints" / name, weights_only=True)  # noqa: E731
    assert load("last.ckpt")["global_step"] == 6 and load("best.ckpt")["global_step"] == 2
    assert cli_value([]) == "[]" and cli_value("a b") == "a b" and cli_value(True) == "true"


def test_stages_are_marked_done_only_when_they_succeed_and_reruns_carry_downstream(tmp_path: Path) -> None:
    pipeline = Pipeline(load_preset("smoke"), tmp_path / "out", tmp_path / "data")
    runs: list[str] = []

    def body(stage: str, ok: bool = True):
        def run() -> None:
            runs.append(stage)
            (pipeline.stage_dir(stage) / "result").write_text(stage)
            if not ok:
                raise StageFailed(f"{stage} failed")
        return run

    outputs = lambda stage: [pipeline.stage_dir(stage) / "result"]  # noqa: E731
    pipeline.stage("clip", outputs("clip"), body("clip"))
    with pytest.raises(StageFailed):
        pipeline.stage("latents", outputs("latents"), body("latents", ok=False))
    assert (pipeline.stage_dir("clip") / "done.json").is_file()
    assert not (pipeline.stage_dir("latents") / "done.json").exists()  # failed: no marker, though it wrote a file
    pipeline.stage("clip", outputs("clip"), body("clip"))  # finished: skipped
    pipeline.stage("latents", outputs("latents"), body("latents"))  # unfinished: started again
    assert runs == ["clip", "latents", "latents"]
    with pytest.raises(StageFailed, match="without writing"):
        pipeline.stage("denoiser", outputs("denoiser"), lambda: None)

    forced = Pipeline(pipeline.preset, pipeline.out, pipeline.data_dir, forced_from=STAGES.index("latents"))
    forced.stage("clip", outputs("clip"), body("clip"))
    forced.stage("latents", outputs("latents"), body("latents"))
    assert runs == ["clip", "latents", "latents", "latents"]

    # an unfinished upstream stage that runs again makes the finished stages after it stale: they rerun too
    (pipeline.stage_dir("clip") / "done.json").unlink()
    again = Pipeline(pipeline.preset, pipeline.out, pipeline.data_dir)
    again.stage("vae_gan", outputs("vae_gan"), body("vae_gan"))
    again.stage("clip", outputs("clip"), body("clip"))
    again.stage("latents", outputs("latents"), body("latents"))
    assert runs == ["clip", "latents", "latents", "latents", "vae_gan", "clip", "latents"]
    again = Pipeline(pipeline.preset, pipeline.out, pipeline.data_dir)
    for stage in ("vae_gan", "clip", "latents"):
        again.stage(stage, outputs(stage), body(stage))
    assert runs[-1] == "latents" and len(runs) == 7  # all finished and nothing upstream reran: all skipped


def test_a_failing_fit_stage_names_its_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")  # "built", but no shards: the VAE-GAN's fit fails at once
    code = main(["pipeline", "--preset", "smoke", "--out", str(tmp_path / "out"), "--data", str(data), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "stage vae_gan failed" in err and str(tmp_path / "out" / "vae_gan" / "log.txt") in err
    assert "no shard matches" in (tmp_path / "out" / "vae_gan" / "log.txt").read_text()
    assert not (tmp_path / "out" / "vae_gan" / "done.json").exists()


TINY = [  # the 30-concept build has 4 validation images; a few steps per stage
    "vae_gan.trainer.max_steps=4", "vae_gan.trainer.val_check_interval=4", "vae_gan.model.init_args.disc_start=2",
    "vae_gan.data.init_args.val_batch_size=4", "clip.data.init_args.batch_size=16",
    "clip.data.init_args.val_batch_size=4", "clip.trainer.limit_train_batches=3",
    "denoiser.trainer.max_steps=3", "denoiser.trainer.val_check_interval=3", "denoiser.data.init_args.batch_size=8",
    "denoiser.data.init_args.val_batch_size=4", "denoiser.model.init_args.val_steps=2",
    "evaluate.num_samples=4", "report.steps=2",
]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_smoke_chain_writes_every_stage_and_a_second_call_skips_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out = tmp_path / "emoji", tmp_path / "run"
    args = ["pipeline", "--preset", "smoke", "--out", str(out), "--data", str(data), "--quiet",
            *(x for o in ["data.limit=30", "data.build_size=32", *TINY] for x in ("--override", o))]
    assert main(args) == 0  # builds the 30-concept emoji subset first
    capsys.readouterr()
    counts = json.loads((data / "manifest.json").read_text())["counts"]
    assert "build-emoji --out" in (out / "data" / "command.txt").read_text() and counts["val"]["total"] >= 4

    for stage in STAGES:
        assert (out / stage / "done.json").is_file(), stage
    for stage in ("vae_gan", "clip", "denoiser"):
        assert (out / stage / "checkpoints" / "last.ckpt").is_file()
        assert "lightning_diffusion fit --config" in (out / stage / "command.txt").read_text()
        assert list((out / stage / "csv").glob("*/metrics.csv"))
    latents = json.loads((out / "latents" / "manifest.json").read_text())
    assert latents["counts"] == {"train": {"total": counts["train"]["total"]}, "val": {"total": counts["val"]["total"]}}
    assert latents["options"]["train"]["latent_shape"] == [4, 8, 8] and latents["options"]["train"]["image_size"] == 32
    denoiser_config = (out / "denoiser" / "command.txt").read_text()
    assert str(out / "latents" / "train-*.tar") in denoiser_config and "latent.npy" in denoiser_config
    assert str(out / "vae_gan" / "checkpoints" / "last.ckpt") in denoiser_config
    for name, key in (("vae_gan", "psnr@4"), ("denoiser", "fd_effnet@4")):
        assert key in json.loads((out / "evaluate" / f"{name}.json").read_text())["metrics"]
    report = out / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["stage_seconds"]) >= {"vae_gan", "clip", "latents", "denoiser", "evaluate"}
    assert metrics["evaluation"]["vae_gan"]["metrics"]["psnr@4"] > 0
    for name in ("reconstructions.png", "samples_heldout.png", "samples_train.png", "report.md"):
        assert (report / name).stat().st_size > 0, name
    assert list(report.glob("curve_denoiser_*.png")) and list(report.glob("curve_vae_gan_*.png"))
    val_captions = metrics["prompts"]["heldout"]
    assert all(f"prompt={caption!r}" in (report / "samples_heldout.txt").read_text() for caption in val_captions)

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(args) == 0
    err = capsys.readouterr().err
    assert all(f"{stage}: finished earlier, skipped" in err for stage in STAGES[1:]) and "not rebuilt" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    assert main([*args, "--force", "report"]) == 0
    assert (report / "report.md").stat().st_mtime_ns > stamps[report / "report.md"]
    assert (out / "denoiser" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamps[
        out / "denoiser" / "checkpoints" / "last.ckpt"]
