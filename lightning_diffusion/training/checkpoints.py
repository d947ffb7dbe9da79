"""The loading rule: how anything a user or a file names is loaded, and what is refused.

- **Weights** load with ``torch.load(weights_only=True)``, always passed explicitly, so neither torch's default nor
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` can switch it off: a pickle that would import a function or build an
  arbitrary object (``os.system`` in ``__reduce__``) is refused before it runs. `load_checkpoint` is the one entry;
  `check_checkpoint` vets a file that a library then loads its own way (torchvision's LPIPS backbones).
- **URLs** (``http://``, ``s3://`` ...) are refused unless the caller passes ``allow_url=True`` (the CLI's
  ``--allow_url_ckpt_path true``); then they still load weights-only.
- **Lightning's own loading** (``--ckpt_path``, the auto-resume ``step-*.ckpt``, SLURM's ``hpc_ckpt_*.ckpt``) goes
  through `WeightsOnlyCheckpointIO`, which the CLI installs in every trainer.
- **Hugging Face / diffusers folders**: safetensors weights (`check_safetensors_folder`); a pickled `.bin` in such a
  folder is read with `load_checkpoint` (weights-only) like any other pickle.
- **Class paths** read from a checkpoint (``_class_path``) or a config file are code: `resolve_model_class` maps
  them to one of the project's model classes (`MODEL_CLASSES`; `register_model_class` adds one) *before* anything
  is imported, and checks the class against the expected one; anything else is refused.

Every refusal and every unreadable file is a ``UserError`` with one line naming the file and the fix.

Public API (what commands and loaders call):
``load_checkpoint(path, what=, key=, mmap=False, allow_url=False)`` -> the loaded object;
``check_checkpoint(path, what=, key=)`` -> path, vetted for a library's own loader;
``check_safetensors_folder(folder, what=, key=)`` -> folder, before ``from_pretrained(..., use_safetensors=True)``;
``resolve_model_class(class_path, expected=None, source=)`` -> a project model class, for class paths from files;
``check_checkpoint_class(checkpoint, expected, path=, key=)`` -> refuses another model's checkpoint;
``user_model_class(class_path, flag=)`` -> a LightningModule the user named on the command line;
``register_model_class(class_path, role)`` -> lets files name another project model;
``WeightsOnlyCheckpointIO`` / ``require_weights_only_io(trainer, allow_url)`` / ``check_ckpt_path(...)`` -> the
Lightning side (the CLI uses them).
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_diffusion.errors import UserError

# Project model classes a file may name: canonical class path -> role (used in messages and as `expected`).
MODEL_CLASSES: dict[str, str] = {
    "lightning_diffusion.autoencoder.module.VAEGAN": "VAE-GAN",
    "lightning_diffusion.clip.module.CLIPModule": "CLIP",
    "lightning_diffusion.diffusion.module.Denoiser": "denoiser",
    "lightning_diffusion.classifier.module.NoisyClassifier": "classifier",
}

# Role -> the configs/ folder (training stage) whose `fit` writes such checkpoints, for the fix in messages.
STAGES: dict[str, str] = {"VAE-GAN": "vae_gan", "CLIP": "clip", "denoiser": "denoiser", "classifier": "classifier"}

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CLASS_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
URL_FLAG = "--allow_url_ckpt_path true"


def is_url(path: str | Path) -> bool:
    """Whether `path` names a remote file (``scheme://...``) rather than a local one."""
    return isinstance(path, str) and bool(_URL.match(path))


def refused(path: str | Path, what: str, key: str | None, err: BaseException) -> UserError:
    """The error for a file whose unpickling `weights_only=True` refused (it would run or import code)."""
    where = f" ({key})" if key else ""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation"))]
    reason = (specific or lines or [type(err).__name__])[0].replace("WeightsUnpickler error: ", "")
    return UserError(
        f"{what} file '{path}'{where} was refused: it is not a plain-weights file (loading it would run arbitrary "
        f"code: {reason[:200]}); only load files you trust, re-saved as a state dict"
    )


def _load_url(url: str) -> Any:  # noqa: ANN401 - whatever the file holds
    if url.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, progress=False)
    import fsspec

    with fsspec.open(url, "rb") as handle:
        return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)


def load_checkpoint(path: str | Path, *, what: str = "checkpoint", key: str | None = None,
                    mmap: bool = False, allow_url: bool = False) -> Any:  # noqa: ANN401 - usually a dict
    """Load a checkpoint or weights file with ``weights_only=True`` (see the module docstring).

    ``what`` and ``key`` name the file's role and the argument or config key that points at it, for the message.
    A missing, empty, truncated or unsafe file, a folder, or a URL without ``allow_url`` is a ``UserError``.
    """
    where = f" ({key})" if key else ""
    if is_url(str(path)):
        if not allow_url:
            raise UserError(f"{what} '{path}'{where} is a URL: remote files are not loaded by default; download it "
                            f"and pass the local file, or allow URLs explicitly ({URL_FLAG}; still weights-only)")
        try:
            return _load_url(str(path))
        except pickle.UnpicklingError as err:
            raise refused(path, what, key, err) from err
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise UserError(f"{what} '{path}'{where} could not be fetched or read "
                            f"({str(err).strip().splitlines()[0]}): check the URL or download the file") from err
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}'{where} is a folder, not a file: pass the .ckpt file inside it "
                        "(e.g. checkpoints/last.ckpt)")
    if not path.is_file():
        raise UserError(f"{what} file '{path}'{where} does not exist: check the path, or train that stage first")
    if path.stat().st_size == 0:
        raise UserError(f"{what} file '{path}'{where} is empty (0 bytes): it was never written completely; "
                        "re-download or re-train it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise refused(path, what, key, err) from err
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{what} file '{path}'{where} could not be read ({first}): "
            f"it is truncated or not a PyTorch checkpoint; re-download or re-train it"
        ) from err


def check_checkpoint(path: str | Path, *, what: str = "checkpoint", key: str | None = None) -> Path:
    """Refuse an unsafe or unreadable file before a library loads it its own way (see `load_checkpoint`);
    zip checkpoints are memory-mapped, so a large file costs no second copy in memory."""
    load_checkpoint(path, what=what, key=key, mmap=True)
    return Path(path)


def check_safetensors_folder(folder: str | Path, *, what: str, key: Optional[str] = None) -> Path:
    """A Hugging Face / diffusers folder whose weights are safetensors (looked for in it and one level down, as
    diffusers keeps `unet/`, `vae/`); a folder with only pickled `.bin`/`.pt`/`.ckpt` weights is refused, so
    `from_pretrained(..., use_safetensors=True)` never falls back to unpickling."""
    folder = Path(folder)
    where = f" ({key})" if key else ""
    if not folder.is_dir():
        raise UserError(f"{what} folder '{folder}'{where} does not exist or is not a folder: check the path")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*/*.safetensors")):
        pickled = sorted(p.name for p in [*folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.ckpt")])
        found = f"only pickled weights ({', '.join(pickled[:3])})" if pickled else "no weights"
        raise UserError(f"{what} folder '{folder}'{where} has {found}, no .safetensors file: weights load from "
                        "safetensors only; re-save it with `save_pretrained(folder, safe_serialization=True)`")
    return folder


def register_model_class(class_path: str, role: str) -> None:
    """Allow files to name another model class (a project extension); `class_path` is its canonical path."""
    if not _CLASS_PATH.match(class_path):
        raise ValueError(f"not a class path: {class_path!r}")
    MODEL_CLASSES[class_path] = role


def _canonical(class_path: str) -> Optional[str]:
    """The registered class `class_path` names: itself, or a re-export from a package above its module
    (``lightning_diffusion.autoencoder.VAEGAN``). Pure string matching: nothing is imported."""
    if class_path in MODEL_CLASSES:
        return class_path
    module, _, name = class_path.rpartition(".")
    for known in MODEL_CLASSES:
        known_module, _, known_name = known.rpartition(".")
        if name == known_name and known_module.startswith(module + "."):
            return known
    return None


def _import(canonical: str) -> type:
    import importlib

    module, _, name = canonical.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _roles(expected: Optional[str | type]) -> str:
    if isinstance(expected, type):
        return expected.__name__
    if expected in MODEL_CLASSES:
        return MODEL_CLASSES[expected]
    return expected or " / ".join(dict.fromkeys(MODEL_CLASSES.values()))


def resolve_model_class(class_path: Any, expected: Optional[str | type] = None, *,  # noqa: ANN401 - read from a file
                        source: str = "the checkpoint") -> type:
    """The project model class `class_path` (read from `source`) names, checked before anything is imported.

    Only the classes in `MODEL_CLASSES` (by canonical path or a package re-export) are accepted; only that
    registered path is imported, never the text itself. `expected` (a role such as ``"denoiser"``, a registered
    class path, or a class) further requires the class to be that one or a subclass of it. Anything else is a
    one-line ``UserError``.
    """
    want = _roles(expected)
    canonical = _canonical(class_path) if isinstance(class_path, str) and _CLASS_PATH.match(class_path) else None
    if canonical is None:
        raise UserError(f"{source} names the model class {str(class_path)[:120]!r}, which is not a model of this "
                        f"project ({want}): refused without importing it; use a checkpoint written by this "
                        "project's `fit` (or pass --model-class with one of its classes)")
    try:
        cls = _import(canonical)
    except ImportError as err:
        raise UserError(f"{source} names the model class '{class_path}', which this install does not have ({err}): "
                        "update the project") from err
    if expected is not None:
        base = expected if isinstance(expected, type) else None
        if base is None:
            paths = [expected] if expected in MODEL_CLASSES else [p for p, r in MODEL_CLASSES.items() if r == expected]
            bases = [_import(p) for p in paths]
        else:
            bases = [base]
        if not any(issubclass(cls, b) for b in bases):
            stage = STAGES.get(want, want)
            raise UserError(f"{source} holds a {MODEL_CLASSES[canonical]} model ({class_path}), not a {want} one: "
                            f"pass a checkpoint of the {stage} stage (written by `fit --config configs/{stage}/...`)")
    return cls


def user_model_class(class_path: str, *, flag: str = "--model-class") -> type:
    """A LightningModule class the user named on the command line (their own choice, like a config's class_path:
    imported as given, unlike a class path read from a file); anything but a LightningModule subclass is refused."""
    from lightning.pytorch import LightningModule

    try:
        cls = _import(class_path) if _CLASS_PATH.match(class_path) else None
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"{flag} '{class_path}' cannot be imported ({err}): give a LightningModule class path, e.g. "
                        "lightning_diffusion.diffusion.module.Denoiser") from err
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise UserError(f"{flag} '{class_path}' is not a LightningModule class: give one, e.g. "
                        "lightning_diffusion.diffusion.module.Denoiser")
    return cls


def check_checkpoint_class(checkpoint: Any, expected: str | type, *, path: str | Path,  # noqa: ANN401
                           key: Optional[str] = None) -> None:
    """Refuse a Lightning checkpoint whose stored ``_class_path`` is not `expected` (a role, path or class);
    checkpoints written without LightningCLI store no class path and pass (their weights are checked on load)."""
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    stored = hparams.get("_class_path") if isinstance(hparams, dict) else None
    if stored is not None:
        where = f" ({key})" if key else ""
        resolve_model_class(stored, expected, source=f"checkpoint '{path}'{where}")


class WeightsOnlyCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, loading through `load_checkpoint`: weights-only whatever Lightning, the
    ``weights_only`` argument or the environment ask, URLs only with `allow_url`, every failure one user error."""

    allow_url: bool = False

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = None,  # noqa: ANN401
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        return load_checkpoint(path, what="checkpoint", key="ckpt_path", allow_url=self.allow_url)


def require_weights_only_io(trainer: Any, allow_url: bool = False) -> None:  # noqa: ANN401 - a Trainer
    """Give the trainer the atomic, weights-only checkpoint IO (Lightning's default IO is replaced); another IO
    that does not load through `load_checkpoint` is refused, since Lightning would unpickle with it."""
    from lightning_diffusion.training.resume import install_atomic_io

    install_atomic_io(trainer, allow_url=allow_url)
    current = trainer.strategy.checkpoint_io
    if not isinstance(current, WeightsOnlyCheckpointIO):
        raise UserError(f"trainer.plugins: checkpoint IO {type(current).__name__} does not load weights-only: leave "
                        "it out, or subclass lightning_diffusion.training.checkpoints.WeightsOnlyCheckpointIO")


_SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


def check_ckpt_path(parser: Any, config: Any, subcommand: str) -> Any:  # noqa: ANN401 - jsonargparse objects
    """LightningCLI's reading of ``--ckpt_path`` under the loading rule; returns the updated config.

    The file loads weights-only (a URL only with ``--allow_url_ckpt_path true``); a stored ``_class_path`` must be
    the config's ``model.class_path`` (the same text, or the same registered project class) and is never imported
    otherwise; then, as LightningCLI does, the checkpoint's hyper-parameters override the config's model arguments.
    """
    section = config[subcommand]
    path = section.get("ckpt_path")
    if not path or path in _SPECIAL_CKPT_PATHS or str(path).startswith("registry"):
        return config
    if is_url(str(path)):
        if not section.get("allow_url_ckpt_path"):
            load_checkpoint(path, key="--ckpt_path")  # raises: URLs need the flag
        return config  # Lightning reads no hyper-parameters from a URL; its loading goes through the IO above
    checkpoint = load_checkpoint(path, key="--ckpt_path", mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"checkpoint file '{path}' (--ckpt_path) is not a Lightning checkpoint (no state_dict): "
                        "pass a .ckpt written by `fit` (e.g. <run>/checkpoints/last.ckpt)")
    stored_hparams = checkpoint.get("hyper_parameters") or {}
    hparams = dict(stored_hparams) if isinstance(stored_hparams, dict) else {}
    hparams.pop("_instantiator", None)
    stored = hparams.pop("_class_path", None)
    if stored is not None:
        _check_stored_class(stored, (section.get("model") or {}).get("class_path"), path)
    if "pytorch-lightning_version" not in checkpoint:
        raise UserError(f"checkpoint file '{path}' (--ckpt_path) holds weights but no trainer state (it was not "
                        "written by a Lightning Trainer): pass a .ckpt written by `fit`, or load the weights into "
                        "the model instead (e.g. model.vae_checkpoint for a VAE-GAN)")
    if stored is not None:
        model: dict[str, Any] = {"class_path": stored, "dict_kwargs": hparams}
    elif hparams:
        model = hparams
    else:
        return config
    return parser.parse_object({subcommand: {"model": model}}, config)


def _check_stored_class(stored: Any, configured: Optional[str], path: Any) -> None:  # noqa: ANN401
    """The checkpoint's class must be the config's: the same class path (the user's config imported it already), or
    a registered project class that is the configured class; without a configured class, a registered one."""
    source = f"checkpoint '{path}' (--ckpt_path)"
    if not configured:
        resolve_model_class(stored, source=source)
        return
    if stored == configured:
        return
    canonical = _canonical(stored) if isinstance(stored, str) and _CLASS_PATH.match(stored) else None
    if canonical is None or _import(canonical) is not _configured_class(configured):
        held = f"a {MODEL_CLASSES[canonical]} model ({stored})" if canonical else f"the model class {str(stored)[:120]!r}"
        raise UserError(f"{source} holds {held} but the config trains {configured}: pass the checkpoint of this "
                        "config's model, or the config it was trained with")


def _configured_class(class_path: str) -> Optional[type]:
    """The class the user's own config names (jsonargparse has imported it already while parsing)."""
    try:
        return _import(class_path)
    except (ImportError, AttributeError, ValueError):
        return None
