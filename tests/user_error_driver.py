"""Runs several command lines in one Python process (imports paid once), each as `main(argv)` would run from the
shell: its own working directory, fd 2 captured (so logging handlers and C-level writes are seen too), an uncaught
exception printed as the traceback a user would see. Reads `[[entry, argv, cwd], ...]` as JSON on stdin and prints
`[[exit code, stderr], ...]` as JSON on stdout. Used by tests/test_user_errors.py."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback


def run_one(entry: str, argv: list[str], cwd: str) -> tuple[int, str]:
    if entry == "data_pipelines":
        from data_pipelines.cli import main
    else:
        from lightning_diffusion.cli import main
    saved_fd, saved_cwd = os.dup(2), os.getcwd()
    with tempfile.TemporaryFile(mode="w+") as captured:
        sys.stderr.flush()
        os.dup2(captured.fileno(), 2)
        try:
            os.chdir(cwd)
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - what the user would see: a traceback and status 1
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            os.chdir(saved_cwd)
        captured.seek(0)
        return code, captured.read()


if __name__ == "__main__":
    cases = json.load(sys.stdin)
    print(json.dumps([run_one(*case) for case in cases]))
