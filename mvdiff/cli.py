"""The ``mvdiff`` command: one entry point, one subcommand per job.

Each subcommand lives in ``mvdiff/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args)``; heavy imports happen inside ``run`` so that ``mvdiff --help`` is instant.
Bad input (:class:`mvdiff.errors.UserError`) ends as one line on stderr and exit status 2.

Signals: Ctrl-C (SIGINT) raises ``KeyboardInterrupt`` and SIGTERM raises
:class:`mvdiff.errors.Terminated` (a ``KeyboardInterrupt``) in the main thread, so a command
cleans up the same way for both (closes what is complete, abandons what is in flight); they
end as one line on stderr and exit status 130 / 143. A second SIGTERM during that clean-up
is ignored (SIGKILL still ends the process); forked children die on SIGTERM as before.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading

import mvdiff.commands
from mvdiff import __version__
from mvdiff.errors import Terminated, UserError, interrupt


def _command_modules() -> list:
    """Every module of ``mvdiff/commands`` (alphabetical): adding a file adds a subcommand."""
    names = sorted(m.name for m in pkgutil.iter_modules(mvdiff.commands.__path__))
    return [importlib.import_module(f"mvdiff.commands.{name}") for name in names]


class _ConsoleHandler(logging.Handler):
    """Messages below WARNING to stdout (what the commands used to print), warnings and
    errors to stderr; the streams are looked up at each record (so redirections hold)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(quiet: bool = False) -> None:
    """The one place that configures logging (library modules only log): ``mvdiff.*``
    records at INFO (WARNING with ``--quiet``, and on every process but rank 0 of a
    distributed launch) as plain lines; ``--quiet`` also turns off tqdm progress bars.
    Idempotent: a second call only changes the level."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    logger = logging.getLogger("mvdiff")
    logger.setLevel(logging.WARNING if quiet or rank != 0 else logging.INFO)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvdiff",
        description="MVDream-style multi-view diffusion: render, train, sample, personalise, "
        "reconstruct.",
    )
    parser.add_argument("--version", action="version", version=f"mvdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _command_modules():
        module.add_parser(sub)
    return parser


def _terminated_handler(owner: int):
    """The SIGTERM handler of process ``owner``: raise :class:`Terminated` there. A process
    forked from it (a DataLoader worker, say) inherits the handler but dies as SIGTERM would
    have killed it, without a traceback."""

    def handler(signum, frame) -> None:
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up
        interrupt(Terminated())  # now, or after a write in progress (interrupts_deferred)

    return handler


def _sigint(signum, frame) -> None:
    interrupt(KeyboardInterrupt())  # Python's own, but held during interrupts_deferred


def _one_line(text: str) -> str:
    """``text`` with control characters escaped (a newline in a file name stays ``\\n``)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _note(e: BaseException) -> str:
    """``": NOTE"`` from an interrupt's message (what was kept), else ``""``; one line."""
    text = _one_line(e)
    return f": {text}" if text else ""


def main(argv: list[str] | None = None) -> int:
    from mvdiff.commands.text_to_3d import image_alias

    parser = build_parser()
    argv = image_alias(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    setup_logging(quiet=getattr(args, "quiet", False))
    previous = previous_int = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated_handler(os.getpid()))
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous_int = signal.signal(signal.SIGINT, _sigint)
    try:
        result = args.run(args)
    except UserError as e:
        print(f"mvdiff {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"mvdiff {args.command}: terminated (SIGTERM){_note(e)}", file=sys.stderr)
        return 143
    except KeyboardInterrupt as e:
        print(f"mvdiff {args.command}: interrupted{_note(e)}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
