"""Safe loading of checkpoints and weight files that come from outside this process."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from lightning_diffusion.errors import UserError


def load_checkpoint(path: str | Path, *, what: str = "checkpoint", key: str | None = None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a missing, unreadable or unsafe file is a ``UserError``.

    ``what`` and ``key`` name the file's role and the config key that points at it, for the message.
    """
    path = Path(path)
    where = f" ({key})" if key else ""
    if not path.is_file():
        raise UserError(f"{what} file '{path}'{where} does not exist: check the path, or train that stage first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{what} file '{path}'{where} was refused: it is not a plain-weights file "
            f"(loading it would run arbitrary code: {str(err).splitlines()[0]}); only load files you trust, "
            f"re-saved as a state dict"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(
            f"{what} file '{path}'{where} could not be read ({str(err).splitlines()[0]}): "
            f"it is truncated or not a PyTorch checkpoint; re-download or re-train it"
        ) from err
