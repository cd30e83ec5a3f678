"""Errors whose message is for the user. Commands raise them; `mlkube.cli.main` alone turns
one into a line `error: <message>` on stderr (never a traceback) and the exit code its class
names."""

from typing import ClassVar


class CommandFailed(Exception):
    """A command could not do its work (a check failed, a server did not answer): exit 1."""

    exit_code: ClassVar[int] = 1


class UserError(CommandFailed, ValueError):
    """Bad input: a one-line message naming the field or file; exit 2."""

    exit_code = 2


def first_line(error: BaseException) -> str:
    """An exception's message in one line (its type's name when it has none)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
