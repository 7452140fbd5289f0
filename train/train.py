#!/usr/bin/env python
"""Train an MVDream-style multi-view diffusion model on multi-view + 2D shards.

    python train/train.py --config train/configs/tiny_cpu.yaml --set max_steps=20
    accelerate launch --config_file train/accelerate/ddp_8gpu.yaml train/train.py \
        --config train/configs/mvdream_sd21.yaml --set data.mv_shards='/data/mv-{000000..000999}.tar'

The config is a YAML file of :class:`mvdiff.training.config.TrainConfig` (unknown keys are
errors); ``--set key=value`` overrides any entry (``--set optim.lr=5e-5``). The resolved
config is saved as ``OUTPUT_DIR/config.yaml`` (a one-line summary is logged). The loop itself is
:func:`mvdiff.training.trainer.train`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from mvdiff.cli import setup_logging
    from mvdiff.commands.train import add_arguments, config_from_args
    from mvdiff.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(quiet=args.quiet)
    try:
        cfg = config_from_args(args)
        from mvdiff.training.trainer import TrainingInterrupted, train

        train(cfg)
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # SIGTERM / Ctrl-C: a checkpoint was saved
        print(f"train.py: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
