"""``mvdiff train``: train a multi-view diffusion model (also under ``accelerate launch``)."""

from __future__ import annotations

import argparse
import sys

HELP = "train a multi-view diffusion model on multi-view + 2D shards (accelerate-ready)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mvdiff.config import (
        add_config_arguments,
        add_flag,
        add_quiet_argument,
        add_resume_argument,
    )

    add_config_arguments(parser, "TrainConfig (train/configs/*.yaml)", "optim.lr=5e-5")
    add_flag(
        parser, "--steps", aliases=("--max-steps",), type=int, help="same as --set max_steps=N"
    )
    add_flag(
        parser,
        "--output",
        aliases=("--output-dir",),
        metavar="DIR",
        help="same as --set output_dir=DIR",
    )
    add_resume_argument(parser, "OUTPUT/checkpoints")
    add_quiet_argument(parser)


def config_from_args(args):
    from mvdiff.config import config_from_args as resolve
    from mvdiff.training.config import TrainConfig

    flags = {
        "--steps": ("max_steps", args.steps),
        "--output": ("output_dir", args.output),
        "--resume": ("checkpoint.resume", args.resume),
    }
    return resolve(TrainConfig, args, flags)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help=HELP,
        description=HELP + ". Launch on several processes with `accelerate launch -m "
        "mvdiff.cli train ...` or `accelerate launch train/train.py ...`.",
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from mvdiff.training.trainer import TrainingInterrupted, train

    try:
        train(config_from_args(args))
    except TrainingInterrupted as e:  # SIGTERM / Ctrl-C: a checkpoint was saved
        print(f"mvdiff {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    return 0
