"""Argument types and output checks shared by the command-line tools, so a mistake is one line before any work.

The `argparse` types (`finite_float`, `positive_int`, ...) refuse NaN, infinities and counts that make no sense
where the value is read; `OneLineParser` turns argparse's usage + error into one `UserError`; `check_output_file`
and `check_output_dir` look at an output path before anything is computed; `atomic_output` writes a file or folder
under a temporary name and renames it at the end, so a failure (full disk, interrupt) leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from lightning_diffusion.errors import UserError

# errno values of a write that fails for a reason the user can fix (space, permissions, a read-only mount).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one `UserError` line (the CLI prints it and exits 2), no usage block."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give e.g. 1.5")
    return value


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite."""
    return _number(text)


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A finite float in [0, 1)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """An int >= 1 (counts, sizes, steps)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An int >= 0 (workers, seeds)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def device_name(text: str) -> str:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps`, checked against this machine (a missing GPU is one line here)."""
    import torch

    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available on this machine; use cpu or auto")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use cpu or auto")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; use auto, cpu, cuda or cuda:N")
    return text


def _writable_folder(folder: Path, key: str) -> None:
    """The nearest existing folder at or above `folder` must be a writable folder."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():
            raise UserError(f"{key}: '{probe}' is a dangling symbolic link; remove it or choose another path")
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{key}: '{probe}' is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{key}: the folder '{probe}' is not writable; choose another path or fix its permissions")


def check_output_file(path: str | Path, key: str, suffixes: tuple[str, ...] = ()) -> Path:
    """An output file path, checked before any work: the right suffix, not a folder, in a writable folder."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserError(f"{key} '{path}' must end in {' or '.join(suffixes)}, e.g. {path.with_suffix(suffixes[0]).name}")
    if path.is_dir():
        raise UserError(f"{key} '{path}' is a folder; give a file name inside it, e.g. {path / ('out' + (suffixes or ('',))[0])}")
    _writable_folder(path.parent if str(path.parent) else Path("."), key)
    return path


def check_output_dir(path: str | Path, key: str) -> Path:
    """An output folder path, checked before any work: not an existing file, creatable and writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{key} '{path}' is an existing file, not a folder; choose a folder path")
    _writable_folder(path, key)
    return path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a file or a folder); on success it replaces `path`, on any
    error it is removed, so `path` is either the old content or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")  # the suffix tells PIL the format
    try:
        yield temporary
        if path.is_dir() and temporary.is_dir():
            shutil.rmtree(path)
        os.replace(temporary, path)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)


def write_error(err: OSError) -> UserError | None:
    """A one-line `UserError` for a write that failed for a fixable reason (full disk, read-only, permissions)."""
    if err.errno not in WRITE_ERRNOS:
        return None
    where = f" '{err.filename}'" if err.filename else ""
    return UserError(f"cannot write{where}: {err.strerror}; free some space or choose a writable --out "
                     "(nothing half-written was left)")
