"""``mvdiff quickstart``: render -> 2D shard -> train -> sample -> index.html, on CPU.

The story itself is :mod:`mvdiff.quickstart`; this module only parses the typed config
(:class:`mvdiff.quickstart.QuickstartConfig`: defaults <- ``--config YAML`` <- ``--set``).
"""

from __future__ import annotations

HELP = "the whole pipeline on bundled real data in a few CPU minutes, with an HTML report"


def add_parser(subparsers) -> None:
    from mvdiff.config import add_config_arguments, add_quiet_argument

    parser = subparsers.add_parser(
        "quickstart",
        help=HELP,
        description=HELP + ": renders the bundled 3D assets with Blender, writes multi-view "
        "shards and a 2D image-text shard of bundled photos, trains a tiny multi-view model "
        "jointly on both, samples 4 views for a prompt, runs a short text-to-3D (SDS) "
        "with it and writes OUTPUT/index.html. "
        "Re-running with the same settings resumes (finished stages are skipped); a folder "
        'holding a run with other settings is refused. Needs bpy: pip install -e ".[render]".',
    )
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder")
    add_config_arguments(
        parser,
        "QuickstartConfig (sections: render, photos, train, sample, text3d; also seed, threads)",
        "train.max_steps=40 --set render.views=4",
    )
    add_quiet_argument(parser)
    parser.set_defaults(run=run)


def config_from_args(args):
    from mvdiff.config import config_from_args as resolve
    from mvdiff.quickstart import QuickstartConfig

    return resolve(QuickstartConfig, args, {"--output": ("output", args.output)})


def run(args) -> int:
    from mvdiff.quickstart import run_quickstart

    run_quickstart(config_from_args(args))
    return 0
