"""Safe loading of checkpoints and weight files that come from outside this process.

Everything loads with ``weights_only=True``: a pickle that would import a function or build an arbitrary object
(``os.system`` in ``__reduce__``) is refused before it runs, with a ``UserError`` naming the file. Files that a
library loads itself with ``weights_only=False`` (torchvision's LPIPS backbones) are checked first with
`check_checkpoint`, which memory-maps zip checkpoints so a large file costs no second copy in memory.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from lightning_diffusion.errors import UserError


def refused(path: str | Path, what: str, key: str | None, err: BaseException) -> UserError:
    """The error for a file whose unpickling `weights_only=True` refused (it would run or import code)."""
    where = f" ({key})" if key else ""
    return UserError(
        f"{what} file '{path}'{where} was refused: it is not a plain-weights file (loading it would run arbitrary "
        f"code: {str(err).splitlines()[0]}); only load files you trust, re-saved as a state dict"
    )


def load_checkpoint(path: str | Path, *, what: str = "checkpoint", key: str | None = None,
                    mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a missing, unreadable or unsafe file is a ``UserError``.

    ``what`` and ``key`` name the file's role and the config key that points at it, for the message.
    """
    path = Path(path)
    where = f" ({key})" if key else ""
    if not path.is_file():
        raise UserError(f"{what} file '{path}'{where} does not exist: check the path, or train that stage first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise refused(path, what, key, err) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(
            f"{what} file '{path}'{where} could not be read ({str(err).splitlines()[0]}): "
            f"it is truncated or not a PyTorch checkpoint; re-download or re-train it"
        ) from err


def check_checkpoint(path: str | Path, *, what: str = "checkpoint", key: str | None = None) -> Path:
    """Refuse an unsafe or unreadable file before a library loads it its own way (see `load_checkpoint`)."""
    load_checkpoint(path, what=what, key=key, mmap=Path(path).is_file() and zipfile.is_zipfile(path))
    return Path(path)
