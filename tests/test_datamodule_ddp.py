"""A real `Trainer.fit` with strategy="ddp" on 2 CPU processes (gloo) over shards of unequal sizes.

The test runs this file as a script in a subprocess (Lightning's ddp launcher re-runs the script for rank 1).
Each rank records the keys of every batch; the test checks the epochs finish, every rank saw the same number of
full batches, the ranks' samples are disjoint, workers followed the trainer's epoch, and the skipped sample was
logged once as `data/skipped_samples`, summed over ranks.
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

COUNTS = [13, 4, 9, 6]  # 32 samples = 2 ranks x 4 batches x 4; one of them is corrupt
BAD_KEY = "s1_002"


def write_shards(directory: Path) -> list[str]:
    import webdataset as wds
    from PIL import Image

    keys = []
    for shard, count in enumerate(COUNTS):
        with wds.TarWriter(str(directory / f"train-{shard:06d}.tar")) as writer:
            for index in range(count):
                key = f"s{shard}_{index:03d}"
                buffer = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), index * 9, np.uint8)).save(buffer, format="PNG")
                png = b"\x89PNG broken" if key == BAD_KEY else buffer.getvalue()
                writer.write({"__key__": key, "png": png, "txt": f"caption {key}"})
                keys.append(key)
    return keys


def main(directory: str) -> None:
    import torch
    from lightning.pytorch import LightningModule, Trainer

    from data_pipelines import ShardDataModule

    class KeyRecorder(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.seen: dict[int, list[list[str]]] = {}

        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).append(list(batch["key"]))
            return self.layer(batch["image"].mean(dim=(2, 3))).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.set_num_threads(1)
    dm = ShardDataModule(f"{directory}/train-*.tar", image_size=8, batch_size=4, num_workers=2, shuffle_buffer=4, seed=3)
    model = KeyRecorder()
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, precision="32-true",
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      default_root_dir=directory)
    trainer.fit(model, datamodule=dm)
    result = {"seen": model.seen, "skipped": float(trainer.callback_metrics["data/skipped_samples"]),
              "local_skipped": dm.skipped_samples["train"], "epoch": dm.state_dict()["epoch"]}
    Path(directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_ddp_fit_over_unequal_shards_finishes_with_equal_disjoint_batches(tmp_path):
    keys = write_shards(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=55)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    from data_pipelines import ShardDataModule

    for epoch in ("0", "1"):
        batches = [rank["seen"][epoch] for rank in ranks]
        assert [len(b) for b in batches] == [4, 4] and all(len(batch) == 4 for b in batches for batch in b)
        flat = [key for b in batches for batch in b for key in batch]
        assert set(flat) == set(keys) - {BAD_KEY} and len(flat) == 32  # one good sample replaces the bad one
        for rank in range(2):  # what each rank's workers yielded is exactly the plan for (seed, epoch, rank)
            dm = ShardDataModule(f"{tmp_path}/train-*.tar", image_size=8, batch_size=4, num_workers=2,
                                 shuffle_buffer=4, seed=3)
            dm._rank_world = lambda rank=rank: (rank, 2)
            stream = dm.train_dataloader().dataset
            planned = sorted(tuple(b["key"]) for w in range(2) for b in stream.iter_worker(w, int(epoch)))
            assert sorted(tuple(b) for b in ranks[rank]["seen"][epoch]) == planned
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1.0
    assert ranks[0]["local_skipped"] + ranks[1]["local_skipped"] == 2  # once per epoch


if __name__ == "__main__":
    main(sys.argv[1])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # gloo's threads left to interpreter exit aborted a rank once (SIGABRT)
