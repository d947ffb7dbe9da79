"""The VAE-GAN under `Trainer(strategy="ddp", devices=2)` on CPU (gloo), fed by the real `ShardDataModule`.

The test runs this file as a script in a subprocess (Lightning's ddp launcher re-runs the script for rank 1; a
fork after OpenMP use can hang, a fresh interpreter cannot). Training crosses `disc_start`, so the reducer sees
steps without and with the GAN terms (plain "ddp": `find_unused_parameters=False`). Each rank records the
posterior samples of its batches and finally calls `measure_latent_scale` on its own data; the test checks both ranks end with the same weights (discriminator
included, trained after `disc_start` only), the same `latent_scale`, equal to 1 / std of both ranks' samples of
the last `latent_scale_batches` steps, and that the Lightning checkpoint reloads through `load_frozen`.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DISC_START, MAX_STEPS, WINDOW = 2, 4, 3


def write_shards(directory: Path) -> None:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    for shard in range(2):
        with wds.TarWriter(str(directory / f"train-{shard:06d}.tar")) as writer:
            for index in range(16):
                buffer = io.BytesIO()
                pixels = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((5, 5, 1))).astype(np.uint8)  # 20 px
                Image.fromarray(pixels).save(buffer, format="PNG")
                writer.write({"__key__": f"s{shard}_{index:03d}", "png": buffer.getvalue(), "txt": "an emoji"})


def rank_batches(rank: int) -> list[dict]:
    """Different data per rank (and a different spread) for `measure_latent_scale`."""
    import torch

    g = torch.Generator().manual_seed(10 + rank)
    return [{"image": (torch.rand(4, 3, 16, 16, generator=g) * 2 - 1) * (0.3 + 0.7 * rank)} for _ in range(3)]


def main(directory: str) -> None:
    import torch
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from data_pipelines import ShardDataModule
    from lightning_diffusion.autoencoder import VAEGAN

    class Record(Callback):
        def __init__(self) -> None:
            self.latents: list[list[float]] = []
            self.disc_changed: list[bool] = []

        def on_train_start(self, trainer, module) -> None:
            self.disc_before = [p.detach().clone() for p in module.discriminator.parameters()]

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            state = torch.random.get_rng_state()
            with torch.no_grad():  # the same posterior sample the training step is about to draw
                self.latents.append(module.encode(batch["image"]).sample().flatten().tolist())
            torch.random.set_rng_state(state)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            now = list(module.discriminator.parameters())
            self.disc_changed.append(any(not torch.equal(a, b) for a, b in zip(self.disc_before, now)))

    torch.set_num_threads(1)
    model = VAEGAN(image_size=16, channels=16, channel_mults=[1, 2], num_blocks=1, latent_channels=4, disc_channels=8,
                   disc_layers=2, perceptual="none", val_frechet=False, image_every_n_steps=0,
                   latent_scale_batches=WINDOW, disc_start=DISC_START, disc_weight=0.5, lr=1e-3)
    data = ShardDataModule(f"{directory}/train-*.tar", image_size=16, batch_size=4, num_workers=0, shuffle_buffer=8,
                           seed=1)
    record = Record()
    checkpoint = ModelCheckpoint(dirpath=f"{directory}/checkpoints", save_last=True, save_top_k=0)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=MAX_STEPS, logger=False,
                      precision="32-true", enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[record, checkpoint], default_root_dir=directory)
    trainer.fit(model, datamodule=data)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    training_scale = float(model.latent_scale)
    torch.manual_seed(trainer.global_rank)
    measured = model.measure_latent_scale(rank_batches(trainer.global_rank), num_batches=2)
    result = {"measured": measured, "measured_buffer": float(model.latent_scale),"latents": record.latents, "disc_changed": record.disc_changed, "global_step": trainer.global_step,
              "latent_scale": training_scale, "weights_sum": float(weights.double().sum()),
              "weights_abs": float(weights.double().abs().sum())}
    Path(directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


@pytest.mark.timeout(150)
def test_ddp_fit_across_disc_start_syncs_weights_and_latent_scale(tmp_path: Path) -> None:
    import torch

    from lightning_diffusion.autoencoder import VAEGAN

    write_shards(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=140)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank in ranks:
        assert rank["global_step"] == MAX_STEPS
        assert rank["disc_changed"] == [step >= DISC_START for step in range(MAX_STEPS)]
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"] and ranks[0]["weights_abs"] == ranks[1]["weights_abs"]
    assert ranks[0]["latents"][0] != ranks[1]["latents"][0]  # the ranks saw different data
    window = torch.tensor([v for rank in ranks for step in rank["latents"][-WINDOW:] for v in step], dtype=torch.float64)
    assert ranks[0]["latent_scale"] == ranks[1]["latent_scale"]
    assert ranks[0]["latent_scale"] == pytest.approx(float(1 / window.std()), rel=1e-5)
    frozen = VAEGAN.load_frozen(tmp_path / "checkpoints" / "last.ckpt")
    assert float(frozen.latent_scale) == ranks[0]["latent_scale"]

    # measure_latent_scale after training: every rank gets 1 / std of both ranks' samples
    samples = []
    with torch.no_grad():
        for rank in range(2):  # the ranks' draws: seed = rank, two batches in order
            torch.manual_seed(rank)
            samples += [frozen.encode(batch["image"]).sample().double().flatten() for batch in rank_batches(rank)[:2]]
    assert ranks[0]["measured"] == ranks[1]["measured"] == ranks[0]["measured_buffer"]
    global_scale = float(1 / torch.cat(samples).std())
    own_scale = float(1 / torch.cat(samples[:2]).std())  # what rank 0 alone would measure
    assert ranks[0]["measured"] == pytest.approx(global_scale, rel=1e-5)
    # closer to the global value than to rank 0's own (the two can lie within 1e-4 of each other: the posterior
    # noise dominates the latents of a barely trained encoder)
    assert abs(ranks[0]["measured"] - global_scale) < abs(own_scale - global_scale) / 2


if __name__ == "__main__":
    main(sys.argv[1])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # gloo's threads left to interpreter exit aborted a rank once (SIGABRT)
