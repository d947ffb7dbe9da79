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
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < float("inf"):
        kind = "a positive integer" if integer else "a positive number"
        raise UserError(f"{key} must be {kind}, got {value!r}; set e.g. {key}: {example}")


def check_fraction(key: str, value: object, example: object, *, closed: bool = False, optional: bool = False) -> None:
    """A `UserError` naming `key` unless `value` is a number in [0, 1) ([0, 1] when `closed`): dropout rates, Adam
    betas and EMA decays outside it make torch fail late or train on garbage (NaN is outside every range)."""
    if optional and value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (0 <= value <= 1 if closed else 0 <= value < 1):
        bound = "1" if closed else "below 1"
        raise UserError(f"{key} must be a number from 0 to {bound}, got {value!r}; set e.g. {key}: {example}")


def check_betas(key: str, betas: object, example: str) -> None:
    """Adam's (beta1, beta2): two numbers in [0, 1) (torch refuses others only when the optimiser is built)."""
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise UserError(f"{key} must be two numbers in [0, 1), got {betas!r}; set e.g. {key}: {example}")
    for value in betas:
        check_fraction(key, value, example)


def check_nonnegative(key: str, value: object, example: object, *, integer: bool = False) -> None:
    """A `UserError` naming `key` unless `value` is a finite number >= 0 (an int when `integer`)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 <= value < float("inf"):
        kind = "a whole number" if integer else "a number"
        raise UserError(f"{key} must be {kind} of 0 or more, got {value!r}; set e.g. {key}: {example}")
