"""Mistakes of the person running a command, and tpullm's warnings to them.

A user error is something the user can fix from the message alone (a config value, a flag, a
path): the command-line entry points (`tpullm/cli.py`) print its message as one line and exit
non-zero without a traceback. Anything else is a bug or an environment failure and keeps its
traceback. This module sits below `tpullm.config` so every layer can raise and warn.
"""

import os
import sys
import tempfile


class UserError(ValueError):
    """A value or path the user gave that cannot work; the message names it and the fix."""


# What `tpullm.cli.run` reports as one line. Missing, existing and unreadable/unwritable files
# are what a user most often gets wrong; they are listed by type because the standard library
# and Orbax raise them.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, PermissionError)


def warn(message: str) -> None:
    """A warning for the person at the terminal: one line on stderr that stands out from progress."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def is_remote(path: str) -> bool:
    """gs://, s3://, ...: paths that the local filesystem cannot check."""
    return "://" in path


def check_writable(path: str, what: str = "the output directory") -> str:
    """Creates directory `path` if needed and writes a temporary file in it; returns the absolute path.

    Commands call it before hours of work so that an unwritable output fails at once. Remote paths
    (gs://) are left to the first write.
    """
    if is_remote(path):
        return path
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file, not a directory; choose another path")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise UserError(f"{what} {path} is not writable ({reason}); choose another path or fix its permissions") from e
    return path
