"""Errors whose message is for the user: printed as one line, never as a traceback."""


class UserError(ValueError):
    """Bad input: a one-line message naming the field or file."""
