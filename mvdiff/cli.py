"""The ``mvdiff`` command: one entry point, one subcommand per job.

Each subcommand lives in ``mvdiff/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args)``; heavy imports happen inside ``run`` so that ``mvdiff --help`` is instant.
Bad input (:class:`mvdiff.errors.UserError`) ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import mvdiff.commands
from mvdiff import __version__
from mvdiff.errors import UserError


def _command_modules() -> list:
    """Every module of ``mvdiff/commands`` (alphabetical): adding a file adds a subcommand."""
    names = sorted(m.name for m in pkgutil.iter_modules(mvdiff.commands.__path__))
    return [importlib.import_module(f"mvdiff.commands.{name}") for name in names]


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except UserError as e:
        print(f"mvdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mvdiff {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
