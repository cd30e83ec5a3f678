"""Errors whose message is for the user: printed as one line, never as a traceback."""


class UserError(ValueError):
    """Bad input: a one-line message naming the field or file."""


def first_line(error: BaseException) -> str:
    """An exception's message in one line (its type's name when it has none)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
