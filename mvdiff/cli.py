"""The ``mvdiff`` command: one entry point, one subcommand per job.

Each subcommand lives in ``mvdiff/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args)``; heavy imports happen inside ``run`` so that ``mvdiff --help`` is instant.
Bad input (:class:`mvdiff.errors.UserError`) ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from mvdiff import __version__
from mvdiff.commands import convert, quickstart, render, sample, shard_info
from mvdiff.commands import text_to_3d as text_to_3d_command
from mvdiff.commands import train as train_command
from mvdiff.errors import UserError

COMMANDS = [convert, render, shard_info, train_command, sample, quickstart, text_to_3d_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvdiff",
        description="MVDream-style multi-view diffusion: render, train, sample, personalise, "
        "reconstruct.",
    )
    parser.add_argument("--version", action="version", version=f"mvdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
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
