"""A tiny model and test-only callbacks for tests/test_exact_resume.py, loaded by `python -m lightning_diffusion fit`.

`TinyRegressor` draws from the global generators every step (input noise, dropout), like the denoiser's noise and
timesteps, so a resumed run only matches if those draws do. `RecordAndKill` appends each trained batch's keys to
`$RESUME_TEST_LOG` (one JSON line, flushed: it survives SIGKILL), SIGKILLs the process after optimiser step
`$RESUME_TEST_KILL_AT` and saves the final weights to `$RESUME_TEST_WEIGHTS`.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import lightning as L
import torch
from torch import nn


class TinyRegressor(L.LightningModule):
    """Predicts an image's mean colour from the noisy image; AdamW and a per-step LR schedule (both restored)."""

    def __init__(self, lr: float = 0.02) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, 3))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image = batch["image"]
        noisy = image + 0.1 * torch.randn_like(image)
        loss = nn.functional.mse_loss(self.net(noisy), image.mean(dim=(2, 3)))
        self.log("train/loss", loss, batch_size=image.shape[0])
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class RecordAndKill(L.Callback):
    """Records keys per step, dies after one step (see the module docstring), saves the final weights."""

    def __init__(self) -> None:
        self.log_path = os.environ["RESUME_TEST_LOG"]
        self.kill_at = int(os.environ.get("RESUME_TEST_KILL_AT", "-1"))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,  # noqa: ANN401
                           batch: Any, batch_idx: int) -> None:  # noqa: ANN401
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "keys": list(batch["key"])}
        with open(self.log_path, "a") as file:
            file.write(json.dumps(record) + "\n")
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(pl_module.state_dict(), os.environ["RESUME_TEST_WEIGHTS"])
