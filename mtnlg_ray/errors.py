"""Exceptions for mistakes a user can fix.

The CLI prints the message of any `MtnlgError` as one line and exits with code 2;
anything else is a bug and keeps its traceback.
"""

import sys


class MtnlgError(Exception):
    """A user error: bad input, bad config, a missing or corrupt file."""


class ConfigError(MtnlgError):
    """A config file or `--set` override names an unknown key or holds a bad value."""


class CheckpointError(MtnlgError):
    """A checkpoint directory is missing, truncated, or does not match its config."""


class InputError(MtnlgError):
    """An input path, prompt or record cannot be used."""


class Interrupted(MtnlgError):
    """The user stopped a run (Ctrl-C); the CLI says what was kept and exits with code 130."""


def first_line(value: object) -> str:
    """The first line of an exception's (or any value's) text, for one-line messages; the exception's
    type name when it has no text."""
    text = str(value).strip()
    if text:
        return text.splitlines()[0]
    return type(value).__name__ if isinstance(value, BaseException) else ""


def first_few(items: list[str], shown: int = 2) -> str:
    """The first `shown` items joined for a one-line message, then how many more there are:
    "a, b and 3 more"."""
    more = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {more} more" if more > 0 else "")


_WARNED: set[str] = set()


def warn_once(line: str) -> None:
    """Print a warning line on stderr once a process: self-training prepares a fine-tune every round, and
    the same config gave the same warning each time."""
    if line not in _WARNED:
        _WARNED.add(line)
        print(line, file=sys.stderr, flush=True)
