"""``mvdiff dreambooth``: personalise a multi-view model from 3-10 photos (MVDreamBooth).

A mode of ``mvdiff train`` (same loop, checkpoints, ``--resume``, validation, accelerate
launch). Writes ``OUTPUT/model`` (a full model folder) or, with ``--lora``, only
``OUTPUT/adapter`` (it records its base model); both go to ``mvdiff sample --model`` and
``mvdiff text-to-3d --model``.
"""

from __future__ import annotations

import argparse
import sys

HELP = "personalise a multi-view model from 3-10 photos of a subject (MVDreamBooth)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mvdiff.config import (
        add_config_arguments,
        add_flag,
        add_quiet_argument,
        add_resume_argument,
    )

    parser.add_argument(
        "--model",
        metavar="DIR",
        help="starting multi-view model: diffusers folder or official checkpoint (.pt)",
    )
    parser.add_argument("--images", metavar="DIR", help="folder of 3-10 photos (jpg/png/webp)")
    parser.add_argument(
        "--prompt",
        help="instance prompt with the identifier, e.g. 'a photo of sks dog'",
    )
    add_flag(parser, "--output", aliases=("--output-dir",), metavar="DIR",
             help="output folder (checkpoints, model)")  # fmt: skip
    parser.add_argument("--identifier", help="the subject's identifier token (default: sks)")
    parser.add_argument(
        "--lora",
        action="store_true",
        help="train a LoRA adapter (saved alone) instead of all weights",
    )
    parser.add_argument(
        "--prior",
        action="store_true",
        help="prior preservation with class objects the starting model generates (cached)",
    )
    parser.add_argument(
        "--class-prompt", help="class prompt for --prior (default: the prompt without identifier)"
    )
    parser.add_argument(
        "--preservation",
        type=float,
        metavar="LAMBDA",
        help="weight of the parameter-preservation term lambda*mean(|theta-theta0|) (default 1)",
    )
    add_flag(parser, "--steps", aliases=("--max-steps",), type=int,
             help="training steps (same as --set max_steps=N)")  # fmt: skip
    add_config_arguments(
        parser, "DreamBoothTrainConfig (train/configs/dreambooth.yaml; the built-in defaults are "
        "the same)", "optim.lr=2e-5",
    )  # fmt: skip
    add_resume_argument(parser, "OUTPUT/checkpoints")
    add_quiet_argument(parser)


def config_from_args(args):
    """Built-in defaults (= train/configs/dreambooth.yaml) < --config < --set < flags."""
    from mvdiff.config import config_from_args as resolve
    from mvdiff.training.config import DreamBoothTrainConfig

    flags = {
        "--model": ("model.pretrained", args.model),
        "--images": ("dreambooth.images", args.images),
        "--prompt": ("dreambooth.prompt", args.prompt),
        "--output": ("output_dir", args.output),
        "--identifier": ("dreambooth.identifier", args.identifier),
        "--class-prompt": ("dreambooth.prior.class_prompt", args.class_prompt),
        "--preservation": ("dreambooth.param_preservation", args.preservation),
        "--steps": ("max_steps", args.steps),
        "--resume": ("checkpoint.resume", args.resume),
        "--lora": ("dreambooth.lora.enabled", True if args.lora else None),
        "--prior": (
            "dreambooth.prior.enabled",
            True if (args.prior or args.class_prompt) else None,
        ),
    }
    return resolve(DreamBoothTrainConfig, args, flags)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "dreambooth",
        help=HELP,
        description=HELP + ". Trains in 2D mode on the photos with a parameter-preservation "
        "term that keeps the multi-view ability; writes OUTPUT/model or, with --lora, "
        "OUTPUT/adapter, which `mvdiff sample --model` and `mvdiff text-to-3d --model` take. "
        "Multi-GPU: `accelerate launch train/dreambooth.py ...`.",
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from mvdiff.errors import UserError

    cfg = config_from_args(args)
    if not cfg.model.pretrained:
        raise UserError("--model is required: the multi-view model to personalise")
    from mvdiff.training.trainer import TrainingInterrupted, train

    try:
        summary = train(cfg)
    except TrainingInterrupted as e:  # SIGTERM / Ctrl-C: a checkpoint was saved
        print(f"mvdiff {getattr(args, 'command', 'dreambooth')}: {e}", file=sys.stderr)
        return e.exit_code
    result = summary.get("adapter") or summary.get("model")
    if result:
        print(f"wrote {result}; try: {sample_command(cfg, result)}")
    return 0


def sample_command(cfg, result: str) -> str:
    """The one follow-up command printed after training: sample the subject from ``result``
    at the training resolution, into ``OUTPUT/sample``."""
    import shlex

    from mvdiff.commands.sample import SampleSettings

    words = ["mvdiff", "sample", "--model", result, "--prompt", cfg.dreambooth.prompt,
             "--output", f"{cfg.output_dir}/sample"]  # fmt: skip
    size = cfg.data.resolution
    if (size, size) != (SampleSettings.height, SampleSettings.width):
        words += ["--height", str(size), "--width", str(size)]
    return shlex.join(words)
