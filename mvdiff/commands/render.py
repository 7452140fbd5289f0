"""``mvdiff render``: 3D assets -> multi-view webdataset shards (docs/design.md §3, §6, §7)."""

from __future__ import annotations

import argparse

from mvdiff.render.config import FLAG_FIELDS, field_flag

# flag -> RenderConfig field, for flags that override the config file when given
# (--depth and --normal are store_true flags, set below).
FLAGS = {name: name for name in FLAG_FIELDS if name not in ("depth", "normal")}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from mvdiff.config import add_config_arguments, add_quiet_argument

    p = sub.add_parser(
        "render",
        help="render 3D assets into multi-view webdataset shards with Blender",
        description="Render 3D assets (GLB/GLTF/OBJ/FBX/PLY/STL files or folders, Objaverse uids "
        "or LVIS categories) with Blender Cycles on CPU into multi-view webdataset shards plus a "
        "manifest.jsonl. Re-running the same command resumes: done objects are skipped, failed "
        "ones retried. Exit status 0 when the run finished, even if some objects failed (see the "
        "manifest); 2 on bad arguments.",
    )
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="asset files, folders, or objaverse:UID"
    )
    p.add_argument("--output", "-o", help="output folder or fsspec URL (shards + manifest.jsonl)")
    add_config_arguments(
        p, "RenderConfig (see data_prep/configs/render_mvdream.yaml)", "fov_range=[30,40]"
    )
    p.add_argument("--views", type=int, help="views per object (default 32)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default 256)")
    p.add_argument("--samples", type=int, help="Cycles samples per pixel (default 32)")
    p.add_argument("--workers", type=int, help="render processes / Ray actors (default: CPU cores)")
    p.add_argument("--backend", choices=["local", "ray"], help="local process pool or Ray cluster")
    p.add_argument(
        "--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
    )
    p.add_argument("--timeout", type=float, help="seconds per object before the worker is killed")
    p.add_argument("--retries", type=int, help="extra attempts after a crash/timeout (default 1)")
    p.add_argument("--recycle-every", type=int, help="restart workers after N objects (default 50)")
    p.add_argument("--captions", help="CSV of uid,caption (Cap3D layout)")
    p.add_argument(
        "--rig",
        choices=["mvdream", "fixed", "orbit"],
        help="camera rig (default mvdream); fixed: cameras at --set azimuths=[0,90,...] (one "
        "per view) and --set elevations=[15] (one, or one per view); orbit: a turntable at "
        "--set elevations=[15]",
    )
    p.add_argument("--seed", type=int, help="seed of the per-object random rig")
    p.add_argument(
        "--cameras-from",
        metavar="SAMPLE_DIR",
        help="render exactly the cameras of an `mvdiff sample` output folder (its cameras.json; "
        "sets the fixed rig and --views): the ground truth `mvdiff eval --gt` compares with",
    )
    p.add_argument("--engine", help="CYCLES (default), BLENDER_EEVEE or BLENDER_WORKBENCH")
    p.add_argument("--depth", action="store_true", help="also write depth.VVV.png (uint16 mm)")
    p.add_argument("--normal", action="store_true", help="also write normal.VVV.png (world space)")
    p.add_argument(
        "--no-denoise", action="store_true", help="turn the OpenImageDenoise denoiser off"
    )
    p.add_argument("--limit", type=int, help="render at most N (not yet done) objects")
    p.add_argument("--shard-max-samples", type=int, help="objects per shard (default 256)")
    p.add_argument("--objaverse-uids", nargs="+", help="Objaverse uids, or files of uids")
    p.add_argument("--objaverse-lvis", nargs="+", help="Objaverse LVIS categories")
    p.add_argument(
        "--objaverse-mirror", help="base URL of an Objaverse mirror (http(s):// or file://)"
    )
    p.add_argument("--objaverse-cache", help="Objaverse download cache (default ~/.objaverse)")
    p.add_argument("--work-dir", help="local staging folder when --output is a remote URL")
    add_quiet_argument(p)
    p.set_defaults(run=run)


def build_config(args: argparse.Namespace):
    """Defaults <- --config <- --set <- the flags given; validated (RenderConfig.validate)."""
    from mvdiff.config import config_from_args
    from mvdiff.render.config import RenderConfig

    flags = {field_flag(name): (name, getattr(args, flag, None)) for flag, name in FLAGS.items()}
    flags["INPUT"] = ("inputs", list(args.inputs) or None)
    flags["--depth"] = ("depth", True if args.depth else None)
    flags["--normal"] = ("normal", True if args.normal else None)
    flags["--no-denoise"] = ("denoise", False if args.no_denoise else None)
    if getattr(args, "cameras_from", None):
        from mvdiff.errors import UserError
        from mvdiff.render.rigs import cameras_from_sample

        cams = cameras_from_sample(args.cameras_from)
        n = len(cams["azimuths"])
        if args.rig not in (None, "fixed") or args.views not in (None, n):
            raise UserError(f"--cameras-from {args.cameras_from}: sets the fixed rig with its "
                            f"{n} views; leave out --rig/--views")  # fmt: skip
        for key, value in (("rig", "fixed"), ("views", n), ("fov", cams["fov"]),
                           ("elevations", list(cams["elevations"])),
                           ("azimuths", list(cams["azimuths"]))):  # fmt: skip
            flags[f"--cameras-from ({key})"] = (key, value)
    return config_from_args(RenderConfig, args, flags)


def config_summary(cfg) -> str:
    """One line of the main settings; the full config is saved next to the shards."""
    workers = cfg.workers or "one per CPU core"
    quality = f"{cfg.samples} samples" if cfg.engine == "CYCLES" else "no sampling"
    return (
        f"rendering {len(cfg.inputs)} input(s) -> {cfg.output}: rig {cfg.rig}, {cfg.views} "
        f"views at {cfg.resolution}px, {cfg.engine} ({quality}), workers {workers}; full "
        f"config: {cfg.output.rstrip('/')}/render_config.yaml"
    )


def run(args: argparse.Namespace) -> int:
    import json

    from mvdiff.render.runner import render_objects

    cfg = build_config(args)
    if not args.quiet:
        print(config_summary(cfg), flush=True)
    summary = render_objects(cfg, progress=not args.quiet)
    print(
        f"rendered {summary['done']} objects ({summary['views']} views), {summary['failed']} "
        f"failed, {summary['skipped']} already done, in {summary['seconds']:.1f} s -> {cfg.output}"
    )
    print(json.dumps(summary))
    return 0
