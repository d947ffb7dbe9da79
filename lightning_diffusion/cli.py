"""Command-line entry: LightningCLI for fit/validate/test/predict, plus the project's own commands.

`python -m lightning_diffusion fit --config configs/vae_gan/tiny.yaml` trains any of the three models: model and
data are chosen by `class_path` in the config. The other commands (sample, evaluate, compare, sweep, export,
pipeline, ...) live in `lightning_diffusion.commands` and are loaded only when called.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from typing import Any

from lightning_diffusion.arguments import OneLineParser, write_error
from lightning_diffusion.errors import UserError
from lightning_diffusion.training.accumulation import check_accumulation

TRAINER_COMMANDS: dict[str, str] = {
    "fit": "train a model (VAE-GAN, CLIP or denoiser, chosen by the config's model.class_path)",
    "validate": "run the validation loop of a model on its data",
    "test": "run the test loop of a model on its data",
    "predict": "run the predict loop of a model on its data",
}

# name -> (module, one-line help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
PROJECT_COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("lightning_diffusion.commands.sample", "turn prompts into image grids with a denoiser checkpoint"),
    "evaluate": ("lightning_diffusion.commands.evaluate", "score a checkpoint (FID/KID/LPIPS/CLIP score), print a table, write JSON"),
    "compare": ("lightning_diffusion.commands.compare", "compare local runs: final/best metrics, differing hyper-parameters, plots"),
    "sweep": ("lightning_diffusion.commands.sweep", "expand a sweep file into a SLURM job array (--dry-run or --submit)"),
    "encode-latents": ("lightning_diffusion.commands.encode_latents", "encode image shards into latent (and text) shards with frozen encoders"),
    "export": ("lightning_diffusion.commands.export", "write a checkpoint in another library's format (diffusers AutoencoderKL, open_clip, a denoiser folder)"),
    "pipeline": ("lightning_diffusion.commands.pipeline", "run the three-stage quickstart: VAE-GAN, CLIP, latents, denoiser, report"),
}


def _available_project_commands() -> dict[str, tuple[str, str]]:
    """Only commands whose module exists are listed and dispatched."""
    return {
        name: spec for name, spec in PROJECT_COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None
    }


def _top_level_help() -> str:
    lines = [
        "usage: python -m lightning_diffusion <command> [options]",
        "",
        "Latent text-to-image diffusion with PyTorch Lightning: VAE-GAN, CLIP and a conditional denoiser.",
        "",
        "training commands (LightningCLI; `<command> --help` lists every option):",
    ]
    lines += [f"  {name:<10} {text}" for name, text in TRAINER_COMMANDS.items()]
    lines += ["", "project commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in _available_project_commands().items()]
    lines += [
        "",
        "examples:",
        "  python -m lightning_diffusion fit --config configs/vae_gan/tiny.yaml",
        "  python -m lightning_diffusion fit --config configs/vae_gan/tiny.yaml --trainer.max_steps 100",
        "  python -m lightning_diffusion fit --config configs/vae_gan/tiny.yaml --print_config",
    ]
    return "\n".join(lines)


_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value|"
    r"Expected a <class 'NoneType'>|Expected a path but)"
)


def _one_line(message: str) -> str:
    """Collapse jsonargparse's nested multi-line message to `key "k": <the specific problem>`."""
    lines = [line.strip().lstrip("- ").strip() for line in str(message).splitlines()]
    lines = [line for line in lines if line and not _NOISE.match(line)]
    if not lines:
        return "invalid arguments"
    key = None
    head = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0])
    if head:
        key, rest = head.groups()
        lines = ([rest] if rest else []) + lines[1:]
    text = " ".join(lines).replace("Problem with given class_path", "class_path")
    text = re.sub(r"\s+", " ", text).strip()
    return f'key "{key}": {text}' if key else text


def run_lightning(args: list[str]) -> None:
    """Run LightningCLI on `args` (a trainer command first). Parser errors become a `UserError`."""
    from jsonargparse import ArgumentError
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    from lightning_diffusion.training.run_folder import RunFolderConfig

    class DiffusionCLI(LightningCLI):
        """LightningCLI whose parser raises instead of printing usage and exiting."""

        def init_parser(self, **kwargs: Any):  # noqa: ANN201 - Lightning's signature
            parser = super().init_parser(**kwargs)
            parser.exit_on_error = False
            return parser

        def _add_subcommands(self, parser, **kwargs: Any) -> None:  # noqa: ANN001
            super()._add_subcommands(parser, **kwargs)
            for sub in self._subcommand_parsers.values():
                sub.exit_on_error = False

        def _set_seed(self) -> None:
            """Seed quietly; "Seed set to N" is logged once the classes are built, so a bad config stays one line."""
            seed_log = logging.getLogger("lightning.fabric.utilities.seed")
            level = seed_log.level
            seed_log.setLevel(logging.WARNING)
            try:
                super()._set_seed()
            except ValueError as err:  # out of numpy's range, or PL_GLOBAL_SEED not a number
                raise UserError(f"seed_everything: {err}; give an integer in [0, 2**32 - 1], true (random) or "
                                "false (no seeding)") from err
            finally:
                seed_log.setLevel(level)

        def before_instantiate_classes(self) -> None:
            """The run folder must be a folder: a file there is one user error before anything is built."""
            from lightning_diffusion.training.run_folder import check_root

            check_root(self._get(self.config, "trainer.default_root_dir"))

        def instantiate_trainer(self, **kwargs: Any):  # noqa: ANN202 - a Trainer
            """Check model against data and the data's shards first (nothing is written or logged yet); Lightning's
            own checks of the trainer section become one-line user errors. Checkpoints without a `dirpath` go to
            `<default_root_dir>/checkpoints` (lightning_diffusion.training.run_folder)."""
            from lightning.fabric.utilities.exceptions import MisconfigurationException

            from data_pipelines.datamodule import ShardDataModule
            from lightning_diffusion.training.consistency import check_model_matches_data
            from lightning_diffusion.training.run_folder import pin_checkpoint_dirs
            from lightning_diffusion.training.checkpoints import require_weights_only_io

            check_model_matches_data(self.model, self.datamodule)
            if self.subcommand in ("fit", "validate") and isinstance(self.datamodule, ShardDataModule):
                self.datamodule.setup(self.subcommand)  # resolves (and caches) the shard lists; no trainer yet
                if self.subcommand == "fit":
                    _check_val_interval(self.config[self.subcommand]["trainer"], self.datamodule)
            try:
                trainer = super().instantiate_trainer(**kwargs)
            except (MisconfigurationException, ValueError) as err:
                raise UserError(f"trainer: {str(err).splitlines()[0]} (see `python -m lightning_diffusion "
                                f"{self.subcommand} --help`)") from err
            except ModuleNotFoundError as err:  # a precision (or other) plugin whose package is not installed
                raise UserError(f"trainer: this setting needs a package that is not installed ({err}); install it or "
                                "choose another trainer.precision / plugin, e.g. trainer.precision: 32-true") from err
            pin_checkpoint_dirs(trainer)
            require_weights_only_io(trainer, bool(self.config[self.subcommand].get("allow_url_ckpt_path")))
            check_accumulation(trainer, self.model)  # Lightning does not check it (0 would divide by zero)
            seed = self._get(self.config, "seed_everything")
            if seed is not False:
                logging.getLogger("lightning.fabric.utilities.seed").info(f"Seed set to {seed}")
            return trainer

        def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - LightningArgumentParser
            parser.add_argument("--allow_url_ckpt_path", type=bool, default=False,
                                help="let --ckpt_path be a URL (it is still loaded weights-only)")

        def _parse_ckpt_path(self) -> None:
            """`ckpt_path` is read through the loading rule (weights-only, no URL unless allowed) and its stored model
            class must be the config's; its hyper-parameters then update the config, as in LightningCLI."""
            from lightning_diffusion.training.checkpoints import check_ckpt_path

            if self.config.get("subcommand"):
                self.config = check_ckpt_path(self.parser, self.config, self.config.subcommand)

        def before_fit(self) -> None:
            """Log the resolved config to W&B (hyperparameters + config.yaml) and pin the run id on resume."""
            import yaml

            from lightning_diffusion.training.resume import auto_resume_path
            from lightning_diffusion.training.tracking import prepare_loggers

            config = self.config[self.subcommand]
            if config.get("ckpt_path") is None and (resume := auto_resume_path(self.trainer)) is not None:
                self.config_init[self.subcommand]["ckpt_path"] = resume  # the newest ResumeCheckpoint file
            text = self._parser(self.subcommand).dump(config, skip_none=False)
            resuming = self.config_init[self.subcommand].get("ckpt_path") is not None
            prepare_loggers(self.trainer, text, yaml.safe_load(text), resuming=resuming)

    saved_argv = sys.argv
    sys.argv = [saved_argv[0], *args]  # LightningCLI reads sys.argv; passing `args` too makes it warn
    try:
        DiffusionCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_callback=RunFolderConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=_trainer_defaults(),
        )
    except ArgumentError as err:
        message = _one_line(str(err))
        if "<unicode string>" in message:  # jsonargparse parsed a --config file's text: name the file
            configs = [value for flag, value in zip(args, args[1:]) if flag == "--config"]
            configs += [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
            message = message.replace('"<unicode string>"', " or ".join(repr(c) for c in configs) or "the config")
            message = f"{message}; fix the YAML"
        raise UserError(f"{message} (see `python -m lightning_diffusion {args[0]} --help`)") from err
    except Exception as err:
        # jsonargparse wraps errors raised while instantiating classes (a model's constructor validating its
        # arguments) in its own exceptions: surface the user's error itself.
        user_error = _find_user_error(err)
        if user_error is None and isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in str(err):
            user_error = UserError(f"the checkpoint's weights do not fit the configured model ({_state_dict_problem(err)}):"
                                   " pass the checkpoint of this config's model (--ckpt_path), or its config")
        if user_error is None:
            raise
        raise user_error from None
    finally:
        sys.argv = saved_argv


def _check_val_interval(trainer: Any, datamodule: Any) -> None:
    """An int `trainer.val_check_interval` past the end of the epoch fails only once fitting starts: refuse it here."""
    interval, limit = trainer.get("val_check_interval"), trainer.get("limit_train_batches")
    if isinstance(interval, bool) or not isinstance(interval, int) or trainer.get("check_val_every_n_epoch") is None:
        return
    ranks = [trainer.get(key) if isinstance(trainer.get(key), int) else 1 for key in ("devices", "num_nodes")]
    batches = datamodule.train_batches(world=max(1, ranks[0] * ranks[1]))
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    if interval > batches:
        raise UserError(f"trainer.val_check_interval {interval} is longer than the epoch ({batches} training batches): "
                        f"set trainer.val_check_interval to {batches} or less, or trainer.check_val_every_n_epoch: "
                        "null to count batches across epochs")


def _state_dict_problem(err: RuntimeError) -> str:
    """The first specific line of torch's multi-line `load_state_dict` error."""
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    return (lines[0] if lines else str(err).splitlines()[0])[:200]


def _find_user_error(err: BaseException) -> UserError | None:
    """The `UserError` in an exception's cause/context chain, if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _trainer_defaults() -> dict[str, Any]:
    """Defaults every run gets unless its config says otherwise (W&B, offline unless configured)."""
    from lightning_diffusion.training.tracking import default_logger_config

    return {"precision": "32-true", "logger": default_logger_config()}


def _run_project_command(name: str, argv: list[str]) -> int:
    module_name, help_text = _available_project_commands()[name]
    module = importlib.import_module(module_name)
    parser = OneLineParser(prog=f"python -m lightning_diffusion {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    return int(module.run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to LightningCLI or a project command; user errors print one line and return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_level_help())
        return 0 if argv else 2
    command = argv[0]
    try:
        if command in TRAINER_COMMANDS:
            run_lightning(argv)
            return 0
        if command in _available_project_commands():
            return _run_project_command(command, argv[1:])
        raise UserError(
            f"unknown command '{command}': use one of {', '.join([*TRAINER_COMMANDS, *_available_project_commands()])}"
            " (see `python -m lightning_diffusion --help`)"
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # a full disk or read-only folder while writing: one line (outputs are written atomically)
        if (user_error := write_error(err)) is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return user_error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
