"""The one exception type for mistakes a user can fix (config, path, shard, checkpoint, prompt).

The CLI prints its message on one line, without a traceback, and exits with status 2.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input; the message names the thing and the fix."""

    exit_code = 2


def check_positive(key: str, value: object, example: object, *, integer: bool = True, optional: bool = False) -> None:
    """A `UserError` naming `key` unless `value` is a positive int (or a positive number when `integer` is False).

    For constructors that validate their arguments before building anything (`optional` lets None through).
    """
    if optional and value is None:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        kind = "a positive integer" if integer else "a positive number"
        raise UserError(f"{key} must be {kind}, got {value!r}; set e.g. {key}: {example}")
