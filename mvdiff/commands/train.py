"""``mvdiff train``: train a multi-view diffusion model (also under ``accelerate launch``)."""

from __future__ import annotations

import argparse
import sys

HELP = "train a multi-view diffusion model on multi-view + 2D shards (accelerate-ready)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="training config (train/configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. --set optim.lr=5e-5 (repeatable)",
    )
    parser.add_argument("--max-steps", type=int, help="same as --set max_steps=N")
    parser.add_argument("--output-dir", help="same as --set output_dir=DIR")
    parser.add_argument(
        "--resume",
        metavar="latest|PATH",
        help="resume from the newest checkpoint in OUTPUT_DIR/checkpoints or from PATH",
    )


def config_from_args(args):
    from mvdiff.config import load_config
    from mvdiff.training.config import TrainConfig

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    return load_config(TrainConfig, args.config, overrides)


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
