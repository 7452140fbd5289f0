"""``mvdiff quickstart``: render -> 2D shard -> train -> sample + score -> text-to-3D -> index.html.

The story itself is :mod:`mvdiff.quickstart`; this module only parses the typed config
(:class:`mvdiff.quickstart.QuickstartConfig`: defaults <- ``--config YAML`` <- ``--set``).
"""

from __future__ import annotations

HELP = "train a small multi-view model from scratch on CPU in minutes and see what it learned"


def add_parser(subparsers) -> None:
    from mvdiff.config import add_config_arguments, add_quiet_argument

    parser = subparsers.add_parser(
        "quickstart",
        help=HELP,
        description=HELP + ": writes procedural objects ('a {red, green, blue, yellow} "
        "{cube, sphere, cylinder, cone}') and renders them with the bundled real 3D assets "
        "(Blender), writes a 2D image-text shard, trains a multi-view model from scratch "
        "jointly on both, samples 4 views for several prompts and scores them against the "
        "renders (colour, silhouette), runs text-to-3D (SDS) with the model as the prior "
        "and writes OUTPUT/index.html. Re-running with the same settings resumes (finished "
        "stages are skipped); a folder holding a run with other settings is refused. Needs "
        'bpy: pip install -e ".[render]".',
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
