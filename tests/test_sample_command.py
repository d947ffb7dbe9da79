"""`python -m lightning_diffusion sample`: reproducible PNGs, comparison grids, one-line errors for bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from denoiser_support import (
    TINY_UNET, fixed_batch, loader, one_thread, trainer, use_toy_text_encoder,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from lightning_diffusion.cli import main
from lightning_diffusion.diffusion.module import Denoiser


def make_checkpoint(folder: Path, **model_args: object) -> Path:
    torch.manual_seed(0)
    model = Denoiser(**{**TINY_UNET, "ema_decay": 0.9, **model_args})
    with torch.no_grad():  # stand in for a trained model: the zero-initialised branches carry signal
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    saver = ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=2)
    trainer(folder, max_steps=2, enable_checkpointing=True, callbacks=[saver]).fit(model, loader(fixed_batch(), 2))
    return folder / "last.ckpt"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    with pytest.MonkeyPatch.context() as patch, one_thread():
        use_toy_text_encoder(patch)
        return {
            "text": make_checkpoint(tmp_path_factory.mktemp("text"), conditioning="text"),
            "flow": make_checkpoint(tmp_path_factory.mktemp("flow"), conditioning="none", objective="flow",
                                    val_sampler="euler"),
        }


@pytest.fixture(autouse=True)
def _toy_text(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    use_toy_text_encoder(monkeypatch)
    with one_thread():
        yield


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_same_seed_same_pngs_other_seed_other_pngs(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    def sample(seed: int, out: str) -> Path:
        args = ["sample", "--ckpt", str(checkpoints["text"]), "--prompt", "a 3D rendered emoji of koala",
                "--guidance", "3", "--sampler", "ddim", "--steps", "4", "--seed", str(seed), "--n", "4",
                "--out", str(tmp_path / out)]
        assert main(args) == 0
        return tmp_path / out

    first, again, other = sample(0, "a.png"), sample(0, "b.png"), sample(1, "c.png")
    assert pixels(first).shape == (38, 38, 3)  # 2 x 2 grid of 16 px images, 2 px padding
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    singles = sorted((tmp_path / "a").glob("*.png"))
    assert [p.name for p in singles] == [f"row00_{k:03d}.png" for k in range(4)]
    assert pixels(singles[0]).shape == (16, 16, 3)


def test_prompts_times_guidances_make_a_labelled_comparison_grid(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "compare.png"
    args = ["sample", "--ckpt", str(checkpoints["text"]), "--prompt", "a flat vector emoji of koala",
            "--prompt", "a 3D rendered emoji of cat", "--guidance", "1", "5", "--sampler", "heun", "--steps", "3",
            "--n", "3", "--out", str(out)]
    assert main(args) == 0
    assert pixels(out).shape == (4 * 18 + 2, 3 * 18 + 2, 3)  # rows = prompt x guidance, n columns
    lines = out.with_suffix(".txt").read_text().splitlines()
    assert lines[1:] == [
        "row 0: prompt='a flat vector emoji of koala' guidance=1",
        "row 1: prompt='a flat vector emoji of koala' guidance=5",
        "row 2: prompt='a 3D rendered emoji of cat' guidance=1",
        "row 3: prompt='a 3D rendered emoji of cat' guidance=5",
    ]
    rows = pixels(out)[2:, 2:].reshape(4, 18, 3, 18, 3)[:, :16, :, :16]
    assert not np.array_equal(rows[0], rows[1])  # guidance changes the samples
    assert not np.array_equal(rows[0], rows[2])  # and so does the prompt


def test_unconditional_flow_model_samples_with_euler(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "flow.png"
    assert main(["sample", "--ckpt", str(checkpoints["flow"]), "--sampler", "euler", "--steps", "3", "--n", "2",
                 "--out", str(out)]) == 0
    assert pixels(out).shape == (18 + 2, 2 * 18 + 2, 3)  # n = 2: one row of two


@pytest.mark.parametrize(
    ("which", "extra", "message"),
    [
        ("missing", ["--prompt", "a koala"], "does not exist"),
        ("text", ["--prompt", "  "], "--prompt is empty"),
        ("text", [], "give at least one --prompt"),
        ("flow", ["--guidance", "3"], "--guidance 3.0 needs a text- or class-conditioned model"),
        ("flow", ["--sampler", "ddim"], "--sampler 'ddim' needs a DDPM-style model"),
        ("text", ["--prompt", "a koala", "--steps", "-2"], "argument --steps: must be at least 1"),
        ("text", ["--prompt", "a koala", "--n", "0"], "argument --n: must be at least 1"),
        ("flow", ["--label", "2"], "--label given"),
        ("flow", ["--eta", "0.5"], "--eta sets DDIM / ancestral noise"),
        ("text", ["--prompt", "a koala", "--sampler", "ddim", "--rho", "5"], "--rho shapes the karras sigma grid"),
        ("text", ["--prompt", "a koala", "--sampler", "dpmpp_2m", "--s-churn", "40"], "--s-churn"),
        ("text", ["--prompt", "a koala", "--threshold", "0.99", "--clip", "1"], "give one of them"),
    ],
)
def test_bad_input_is_a_one_line_user_error(checkpoints: dict[str, Path], tmp_path: Path, which: str,
                                            extra: list[str], message: str,
                                            capsys: pytest.CaptureFixture) -> None:
    ckpt = checkpoints.get(which, tmp_path / "missing.ckpt")
    assert main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.png"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_help_lists_every_sampling_option(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for flag in ("--sampler", "--steps", "--eta", "--variance", "--spacing", "--grid", "--rho", "--s-churn",
                 "--threshold", "--clip", "--cfg-rescale", "dpmpp_2m", "euler_ancestral", "--guidance",
                 "--classifier", "--classifier-scale", "--label"):
        assert flag in out, flag


def test_new_samplers_and_options_run_end_to_end(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(checkpoints["text"]), "--prompt", "a koala", "--sampler", "edm", "--steps",
                 "3", "--s-churn", "10", "--rho", "5", "--threshold", "0.99", "--guidance", "3", "--cfg-rescale",
                 "0.7", "--n", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert "sampler=edm steps=3" in out.with_suffix(".txt").read_text()
    assert "s_churn=10.0" in out.with_suffix(".txt").read_text()


def test_the_single_image_folder_is_replaced_only_when_sample_wrote_it(checkpoints: dict[str, Path], tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """`--out results.png` writes its single images to `results/`, replacing an earlier call's: a folder of the
    user's own files there is refused (one line) and left as it was."""
    args = ["sample", "--ckpt", str(checkpoints["text"]), "--prompt", "a koala", "--steps", "2", "--n", "2",
            "--device", "cpu", "--out", str(tmp_path / "results.png")]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "my_notes.txt").write_text("mine")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out:") and "\n" not in err and "my_notes.txt" in err, err
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["my_notes.txt"]
    assert not (tmp_path / "results.png").exists()
    (tmp_path / "results" / "my_notes.txt").unlink()
    assert main(args) == 0 and main([*args, "--n", "1"]) == 0  # its own earlier images are replaced
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["row00_000.png"]
