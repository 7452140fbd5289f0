"""SIGTERM / SIGINT during training: finish the step, save a checkpoint, stop with one line.

Cluster schedulers (Slurm, Kubernetes), Docker and Ray stop a job with SIGTERM and a grace
period; Ctrl-C sends SIGINT. Either sets a flag that the training loop reads between steps
(on every rank at the same step, so DDP ranks stop together): it saves a checkpoint of the
step it reached and raises :class:`TrainingInterrupted`, which the commands print as one line
and turn into exit status 128 + signal (143 for SIGTERM, 130 for SIGINT). A second signal
stops at once, without a checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

log = logging.getLogger("mvdiff.train")

__all__ = ["StopSignals", "TrainingInterrupted"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Training was stopped by a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """Context manager: SIGTERM / SIGINT set :attr:`signum` instead of killing the process.

    Only the main thread can install signal handlers; elsewhere this does nothing.
    ``on_exit`` callbacks run when the context ends, however it ends (e.g. closing a progress
    bar, so that an error message starts on a line of its own).
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}
        self.on_exit: list = []

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for callback in self.on_exit:
            callback()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:  # the second one: stop now
            raise TrainingInterrupted(f"stopped by {name} (second signal, no checkpoint)", signum)
        self.signum = signum
        log.warning("%s: stopping after this step with a checkpoint (again: stop at once)", name)

    def requested(self, accelerator) -> int | None:
        """The signal asked for on any rank, or None (a collective when there are ranks)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([float(self.signum or 0)], device=accelerator.device)
        got = int(accelerator.gather(flag).max().item())
        return got or None
