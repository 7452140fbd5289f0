"""Errors that mean "bad input from the user" (a path, a flag, a file), not a bug, and the
exception a SIGTERM becomes.

The ``mvdiff`` command prints them as one line naming the culprit and exits with status 2
(:class:`UserError`), 130 (Ctrl-C) or 143 (:class:`Terminated`).
"""

import contextlib


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


_deferral = {"depth": 0, "pending": None}


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C / SIGTERM (as raised by the ``mvdiff`` command's handlers) until the block
    ends, so that a write and its bookkeeping (a sample and its manifest line, a checkpoint
    and the step it records) are never cut apart; the interrupt is raised right after."""
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
    if _deferral["depth"] == 0 and _deferral["pending"] is not None:
        exc, _deferral["pending"] = _deferral["pending"], None
        raise exc


def interrupt(exc: KeyboardInterrupt) -> None:
    """Raise ``exc`` now, or at the end of the :func:`interrupts_deferred` block running."""
    if _deferral["depth"]:
        if _deferral["pending"] is None:
            _deferral["pending"] = exc
        return
    raise exc
