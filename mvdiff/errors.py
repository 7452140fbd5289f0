"""Errors that mean "bad input from the user" (a path, a flag, a file), not a bug.

The ``mvdiff`` command prints them as one line naming the culprit and exits with status 2.
"""


class UserError(ValueError):
    """Bad input; the message names the file, flag or argument at fault."""
