#!/usr/bin/env python
"""3D assets -> multi-view webdataset shards (docs/design.md §3) with Blender; the config-file entry.

    python data_prep/render.py --config data_prep/configs/render_mvdream.yaml \
        --set inputs=[/data/assets] --set output=/data/mv-shards

    python data_prep/render.py --config data_prep/configs/render_objaverse_lvis.yaml \
        --set output=s3://bucket/mv-shards --set backend=ray --set ray_address=auto

Same as ``mvdiff render --config ...``: the resolved config is printed and saved as
``OUTPUT/render_config.yaml``; re-running the same command resumes (done objects are skipped,
failed ones retried). Exit status 0 when the run finished (failures are in the manifest), 2 on
bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvdiff.cli import setup_logging  # noqa: E402
from mvdiff.config import (  # noqa: E402
    add_config_arguments,
    add_quiet_argument,
    config_from_args,
    dump_config,
)
from mvdiff.errors import UserError  # noqa: E402
from mvdiff.render.config import RenderConfig  # noqa: E402
from mvdiff.render.runner import render_objects  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, "RenderConfig (data_prep/configs/render_*.yaml)", "output=DIR")
    add_quiet_argument(parser)
    args = parser.parse_args(argv)
    setup_logging(quiet=args.quiet)
    try:
        cfg = config_from_args(RenderConfig, args)
        if not args.quiet:
            print(dump_config(cfg), flush=True)
        summary = render_objects(cfg, progress=not args.quiet)
    except UserError as e:
        print(f"render: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
