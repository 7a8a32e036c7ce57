"""Errors a user can fix; the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """An error caused by the user's input (a bad path, flag, preset or file); names what is wrong."""
