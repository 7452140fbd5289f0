#!/usr/bin/env python
"""MVDreamBooth: personalise a multi-view model from 3-10 photos of a subject.

    python train/dreambooth.py --config train/configs/dreambooth.yaml \
        --model /models/mvdream-sd21 --images photos/ --prompt "a photo of sks dog" \
        --output runs/sks-dog [--lora] [--prior]
    accelerate launch --config_file train/accelerate/ddp_8gpu.yaml train/dreambooth.py ...

The config is :class:`mvdiff.training.config.DreamBoothTrainConfig` (a training config with a
``dreambooth`` section; YAML + ``--set key=value``, unknown keys are errors); the flags above
are shortcuts for its entries. The resolved config is saved as
``OUTPUT/config.yaml`` (a one-line summary is logged). The loop is :func:`mvdiff.training.trainer.train` (DreamBooth mode).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from mvdiff.cli import setup_logging
    from mvdiff.commands.dreambooth import add_arguments, run
    from mvdiff.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(quiet=args.quiet)
    try:
        return run(args)
    except UserError as e:
        print(f"dreambooth.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
