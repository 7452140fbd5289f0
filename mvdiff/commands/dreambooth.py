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
    parser.add_argument("--output", metavar="DIR", help="output folder (checkpoints, model)")
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
    parser.add_argument("--steps", type=int, help="training steps (same as --set max_steps=N)")
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="DreamBooth config (train/configs/dreambooth.yaml); the built-in defaults are the same",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. --set optim.lr=2e-5 (repeatable)",
    )
    parser.add_argument(
        "--resume", metavar="latest|PATH", help="resume from OUTPUT/checkpoints (latest) or PATH"
    )


def config_from_args(args):
    """Built-in defaults (= train/configs/dreambooth.yaml) < --config < --set < flags."""
    import json

    from mvdiff.config import load_config
    from mvdiff.training.config import DreamBoothTrainConfig

    overrides = list(args.overrides)

    def flag(key, value):
        if value is not None:
            # JSON quoting: a prompt like "a: b" or "[x]" stays one YAML string
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")

    flag("model.pretrained", args.model)
    flag("dreambooth.images", args.images)
    flag("dreambooth.prompt", args.prompt)
    flag("output_dir", args.output)
    flag("dreambooth.identifier", args.identifier)
    flag("dreambooth.prior.class_prompt", args.class_prompt)
    flag("dreambooth.param_preservation", args.preservation)
    flag("max_steps", args.steps)
    flag("checkpoint.resume", args.resume)
    if args.lora:
        overrides.append("dreambooth.lora.enabled=true")
    if args.prior or args.class_prompt:
        overrides.append("dreambooth.prior.enabled=true")
    return load_config(DreamBoothTrainConfig, args.config, overrides)


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
