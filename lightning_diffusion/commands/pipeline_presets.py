"""Pipeline presets: the YAML files in `configs/pipeline/` (`extends:` chains), `--override STAGE.KEY=VALUE`, and
the up-front check that every key is known and every stage config exists (a typo fails before any stage runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lightning_diffusion.errors import UserError

STAGES = ("data", "vae_gan", "clip", "latents", "denoiser", "evaluate", "report")
FIT_STAGES = ("vae_gan", "clip", "denoiser")
# The preset's keys outside the fit stages' `config`/`overrides` (anything else is a typo, refused up front).
SETTINGS: dict[str, set[str]] = {
    "": {"image_size", "data", "stages"},
    "data": {"dir", "build_size", "limit"},
    "latents": {"batch_size", "posterior"},
    "evaluate": {"num_samples", "batch_size", "encoder", "vae_metrics", "denoiser_metrics"},
    "report": {"guidance", "samples_per_prompt", "steps", "prompts_per_split"},
    **{stage: {"config", "overrides"} for stage in FIT_STAGES},
    "denoiser": {"config", "overrides", "sample_metrics"},
}
REPO_ROOT = Path(__file__).resolve().parents[2]


def find_file(path: str | Path, what: str, fix: str = "check the path") -> Path:
    """A path as given (relative to the working directory), else relative to the repository root."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(f"{what} '{path}' does not exist (looked in {Path.cwd()} and {REPO_ROOT}): {fix}")


def merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: dictionaries merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_preset(name: str, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset (a name in configs/pipeline/ or a file), following `extends:` chains (a loop is refused)."""
    path = find_file(name if name.endswith((".yaml", ".yml")) else f"configs/pipeline/{name}.yaml", "--preset",
                     "give a preset name from configs/pipeline/ (quickstart, smoke) or a YAML file")
    if path.resolve() in _chain:
        raise UserError(f"preset {path}: `extends:` leads back to itself ({' -> '.join(str(p) for p in _chain)} -> "
                        f"{path}); point extends at another preset or remove it")
    try:
        preset = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"preset {path} is not valid YAML ({' '.join(str(err).split())}); fix the file") from err
    if not isinstance(preset, dict):
        raise UserError(f"preset {path} holds a {type(preset).__name__}, not a mapping of settings; write keys such "
                        "as `extends: quickstart` and `stages:` (see configs/pipeline/smoke.yaml)")
    parent = preset.pop("extends", None)
    if parent:
        preset = merged(load_preset(str(path.parent / parent), (*_chain, path.resolve())), preset)
    return preset


def apply_override(preset: dict[str, Any], text: str) -> None:
    """`STAGE.KEY=VALUE` into the preset: into a fit stage's `overrides` (KEY may hold dots), else a setting."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"--override {text!r}: write STAGE.KEY=VALUE, e.g. denoiser.trainer.max_steps=100")
    value = yaml.safe_load(raw) if raw.strip() else None
    head, _, rest = key.partition(".")
    if head not in STAGES and head not in SETTINGS[""]:
        raise UserError(f"--override {text!r}: unknown key '{head}'; start with a stage "
                        f"({', '.join(STAGES[1:])}), data or image_size, e.g. evaluate.num_samples=64")
    if head in FIT_STAGES and rest:
        preset["stages"][head].setdefault("overrides", {})[rest] = value
        return
    target = preset["stages"] if head in STAGES and head != "data" else preset
    parts = key.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def check_preset(preset: dict[str, Any], where: str) -> None:
    stages = preset.get("stages")
    missing = [s for s in ("vae_gan", "clip", "latents", "denoiser", "evaluate", "report") if s not in (stages or {})]
    if missing or not isinstance(preset.get("data"), dict) or not isinstance(preset.get("image_size"), int):
        raise UserError(f"preset {where} needs image_size, data and stages.{{{', '.join(STAGES[1:])}}}; "
                        f"missing: {', '.join(missing) or 'image_size/data'} (see configs/pipeline/quickstart.yaml)")
    size = preset["image_size"]
    if isinstance(size, bool) or size < 1:
        raise UserError(f"preset {where}: image_size must be a positive integer, got {size!r}; set e.g. image_size: 32")
    sections = {"": preset, "data": preset["data"], **{stage: stages[stage] for stage in STAGES[1:]}}
    unknown = [f"{'stages.' if name not in ('', 'data') else ''}{name}{'.' if name else ''}{key}"
               for name, section in sections.items() for key in (section or {}) if key not in SETTINGS[name]]
    unknown += [f"stages.{key}" for key in stages if key not in STAGES]
    if unknown:
        raise UserError(f"preset {where}: unknown key(s) {', '.join(unknown)}; the keys are those of "
                        "configs/pipeline/quickstart.yaml")
    for stage in FIT_STAGES:
        if "config" not in stages[stage]:
            raise UserError(f"preset {where}: stages.{stage}.config is not set (a stage config such as "
                            f"configs/{stage}/tiny.yaml)")
        find_file(stages[stage]["config"], f"stages.{stage}.config",
                  f"point it at a stage config such as configs/{stage}/tiny.yaml")
    if stages["latents"].get("posterior", "mode") not in ("mode", "sample"):
        raise UserError(f"stages.latents.posterior must be mode or sample, got {stages['latents']['posterior']!r}")
