"""Turn shard URL patterns from a config into a concrete, ordered list of shards.

Accepted: a string or a list of strings; each may use brace ranges (`train-{000000..000009}.tar`, as in
webdataset), `::`-separated alternatives, shell globs (`data/emoji/train-*.tar`, matched and sorted), local paths,
`file:` URLs and remote URLs that webdataset's `gopen` opens (`http(s)://`, `gs://`, `hf://`, ...). `pipe:` URLs run
a shell command, so they are refused unless the config says `allow_pipe_urls: true`.
"""

from __future__ import annotations

import glob
import os
import re

import braceexpand

from lightning_diffusion.errors import UserError

BUILD_HINT = "build the emoji shards with `python -m data_pipelines build-emoji --out data/emoji`"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _patterns(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    items = [spec] if isinstance(spec, str) else list(spec)
    return [part.strip() for item in items for part in str(item).split("::") if part.strip()]


def url_scheme(url: str) -> str | None:
    """`pipe`, `http`, ... for URLs with a scheme; None for local paths (a Windows drive letter is a path)."""
    match = _SCHEME.match(url)
    if match is None or len(match.group(1)) == 1:
        return None
    return match.group(1).lower()


def check_pipe_policy(spec: str | list[str] | tuple[str, ...] | None, key: str, allow_pipe_urls: bool) -> None:
    """Refuse `pipe:` URLs (they execute shell commands) unless the user opted in; no file system access."""
    if spec is None or allow_pipe_urls:
        return
    for pattern in _patterns(spec):
        if url_scheme(pattern) == "pipe":
            raise UserError(
                f"{key}: {pattern!r} is a pipe: URL, which runs a shell command; set data.allow_pipe_urls: true "
                "if you trust this config, or give local paths or http(s) URLs"
            )


def _check_readable(path: str, key: str) -> None:
    """A dangling symbolic link or a shard this user cannot read is named here, not dropped or read as empty."""
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"{key}: shard {path!r} is a symbolic link to a missing file ({os.readlink(path)!r}); "
                        "fix or remove the link")
    if os.path.isfile(path) and not os.access(path, os.R_OK):
        raise UserError(f"{key}: shard {path!r} is not readable by this user; fix its permissions "
                        f"(chmod a+r {path}) or leave it out")


def resolve_shards(
    spec: str | list[str] | tuple[str, ...] | None, key: str, allow_pipe_urls: bool = False
) -> list[str]:
    """Expand braces and globs into shard URLs, in the order given (each glob sorted).

    Raises UserError naming `key` and the pattern when a local file is missing, a glob matches nothing or the
    list is empty.
    """
    if spec is None or (not isinstance(spec, str) and len(spec) == 0) or (isinstance(spec, str) and not spec.strip()):
        raise UserError(f"{key} is empty; give shard paths such as data/emoji/train-*.tar ({BUILD_HINT})")
    check_pipe_policy(spec, key, allow_pipe_urls)
    urls: list[str] = []
    for pattern in _patterns(spec):
        try:
            expanded = list(braceexpand.braceexpand(pattern))
        except braceexpand.UnbalancedBracesError:
            raise UserError(f"{key}: {pattern!r} has an unbalanced brace; write ranges as train-{{000000..000009}}.tar "
                            "and close every '{'") from None
        for url in expanded:
            scheme = url_scheme(url)
            if scheme is not None and scheme != "file":
                urls.append(url)
                continue
            path = os.path.expanduser(re.sub(r"^file://?", "", url) if scheme == "file" else url)
            if _GLOB_CHARS.search(path):
                found = sorted(glob.glob(path))
                for match in found:
                    _check_readable(match, key)
                matches = [p for p in found if os.path.isfile(p)]
                if not matches:
                    raise UserError(f"{key}: no shard matches {pattern!r}; check the path or {BUILD_HINT}")
                urls.extend(matches)
            elif os.path.isfile(path):
                _check_readable(path, key)
                urls.append(path)
            else:
                _check_readable(path, key)
                raise UserError(f"{key}: shard {path!r} (from {pattern!r}) does not exist; check the path or {BUILD_HINT}")
    if not urls:
        raise UserError(f"{key}: {spec!r} names no shards; check the pattern or {BUILD_HINT}")
    return urls
