"""The one exception type for mistakes a user can fix (config, path, shard, checkpoint, prompt).

The CLI prints its message on one line, without a traceback, and exits with status 2.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input; the message names the thing and the fix."""

    exit_code = 2
