"""Errors that mean "bad input from the user" (a path, a flag, a file), not a bug, and the
exception a SIGTERM becomes.

The ``mvdiff`` command prints them as one line naming the culprit and exits with status 2
(:class:`UserError`), 130 (Ctrl-C) or 143 (:class:`Terminated`).
"""


class UserError(ValueError):
    """Bad input; the message names the file, flag or argument at fault."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, Docker, Ray, ``kill``) while a ``mvdiff`` command runs.

    The ``mvdiff`` command raises it in the main thread from its SIGTERM handler. It is a
    :class:`KeyboardInterrupt`, so every ``except KeyboardInterrupt`` / ``finally`` that
    cleans up after Ctrl-C runs for SIGTERM too; code that wants to do more on SIGTERM (save a
    checkpoint) catches ``Terminated`` first. Its message, if any, is a note on what was kept
    (the command prints ``mvdiff CMD: terminated (SIGTERM): NOTE`` and exits 143).
    """
