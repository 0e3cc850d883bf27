"""Errors the CLI turns into one clear line on stderr and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: the message names the value, the limit and the fix."""
