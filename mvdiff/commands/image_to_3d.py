"""``mvdiff image-to-3d``: a photo -> a 3D asset (Make-It-3D stage 1 with ImageDream's
image-conditioned multi-view prior; :mod:`mvdiff.sds.image_to_3d`)."""

from __future__ import annotations

import argparse

from mvdiff.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from mvdiff.config import add_config_arguments, add_quiet_argument, add_resume_argument

    p = sub.add_parser(
        "image-to-3d",
        help="optimise a 3D asset from one photo (reference view + image-conditioned SDS)",
        description="Fit a radiance field to a photo seen from a front camera (azimuth 0, "
        "--elevation, --fov; RGB + mask losses) while multi-view SDS from an ImageDream model "
        "conditioned on the photo shapes the novel views; optional depth loss (--depth). The "
        "photo: RGBA (the object cut out) or RGB on a plain background (mask estimated from "
        "the border colour). Writes into --output what text-to-3d writes (mesh.glb/obj/ply, "
        "turntable.gif, views.png, view_00..03.png, checkpoint.pt, config.json, summary.json "
        "with the reference-view PSNR and mask IoU) plus input.png and reference.png. "
        "Settings: a preset (default: 24 GB GPU; --fast: CPU), then --config FILE, then --set "
        "KEY=VALUE, then the flags below.",
    )
    p.add_argument("photo", help="the photo (PNG/JPEG; RGBA cut-out or plain background)")
    p.add_argument(
        "--model",
        default=None,
        help="ImageDream diffusers folder (e.g. from `mvdiff convert sd-v2.1-base-4view-ipmv.pt`; "
        "not needed with --sds-weight 0)",
    )
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--prompt", default=None, help="optional text prompt (default: empty)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: empty)")
    p.add_argument(
        "--elevation", type=float, default=None, help="reference camera elevation, deg (default 0)"
    )
    p.add_argument(
        "--fov", type=float, default=None, help="reference camera field of view, deg (default 40)"
    )
    p.add_argument(
        "--object-fraction",
        type=float,
        default=None,
        help="the object is cropped, scaled to this fraction of the frame and centred "
        "(default 0.55; 0 keeps the photo's framing)",
    )
    p.add_argument(
        "--depth",
        default=None,
        help="depth map of the photo (grey PNG, same size; disparity unless "
        "--set depth_kind=depth): adds 1 - Pearson correlation with the rendered depth",
    )
    p.add_argument(
        "--fast", action="store_true", help="CPU-friendly preset (600 steps, 32² renders)"
    )
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default 10000)")
    p.add_argument("--samples", type=int, default=None, help="samples per ray (default 64)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default 50)")
    p.add_argument("--lr", type=float, default=None, help="grid learning rate (default 0.01)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--mesh-resolution", type=int, default=None, help="marching grid (default 128)")
    p.add_argument(
        "--ref-weight", type=float, default=None, help="reference RGB+mask weight (default 1)"
    )
    p.add_argument(
        "--sds-weight", type=float, default=None, help="SDS weight (default 1; 0 = photo only)"
    )
    p.add_argument("--depth-weight", type=float, default=None, help="depth weight (default 0.05)")
    add_config_arguments(p, "ImageTo3DConfig (YAML or JSON)", "sds.guidance_scale=30")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint period in steps")
    add_resume_argument(p, "OUTPUT/checkpoint.pt", "OUTPUT/checkpoint.pt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_quiet_argument(p)
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)  # old: no bar
    p.set_defaults(run=run)


def resolve_config(args: argparse.Namespace):
    """Preset (default or --fast), then --config, then --set, then the flags; checked."""
    from mvdiff.commands.text_to_3d import load_sds_config
    from mvdiff.config import validate_config
    from mvdiff.sds.image_to_3d import ImageTo3DConfig

    config = load_sds_config(
        ImageTo3DConfig,
        args,
        ("steps", "samples", "lr", "seed", "mesh_resolution", "save_every"),
        ("ref_weight", "sds_weight", "depth_weight"),
    )
    if args.elevation is not None:
        if not -89 <= args.elevation <= 89:
            raise UserError(f"--elevation must be in [-89, 89], got {args.elevation}")
        config.ref_elevation_deg = args.elevation
    if args.fov is not None:
        if not 0 < args.fov < 180:
            raise UserError(f"--fov must be in (0, 180), got {args.fov}")
        config.ref_fov_deg = args.fov
    if args.object_fraction is not None:
        if args.object_fraction == 0:
            config.ref_object_fraction = None
        elif not 0.05 <= args.object_fraction <= 1:
            raise UserError(
                f"--object-fraction must be 0 or in [0.05, 1], got {args.object_fraction}"
            )
        else:
            config.ref_object_fraction = args.object_fraction
    if config.sds_weight > 0 and not args.model:
        raise UserError("--model is required (an ImageDream folder; or --sds-weight 0)")
    if config.ref_views:
        raise UserError("ref_views: not used by image-to-3d (the photo is the reference view)")
    return validate_config(config)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mvdiff.commands.text_to_3d import NO_ROOM, load_prior, resume_flag
    from mvdiff.sds.image_to_3d import image_to_3d, load_depth, load_photo

    config = resolve_config(args)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UserError(f"--output {args.output}: exists and is not a folder")
    photo = load_photo(args.photo, config.ref_object_fraction)  # bad inputs: one line, early
    if args.depth is not None:
        load_depth(args.depth, photo)
    pipe, device = load_prior(args, config)
    try:
        summary = image_to_3d(
            pipe, config, args.photo, args.output, depth_path=args.depth,
            resume=resume_flag(args), progress=not (args.quiet or args.no_progress), device=device,
        )  # fmt: skip
    except OSError as e:
        if e.errno not in NO_ROOM:
            raise
        raise UserError(
            f"--output {args.output}: cannot write {Path(e.filename or '').name} ({e.strerror})"
        ) from None
    print(
        f"wrote {args.output}: mesh {summary['vertices']} vertices / {summary['faces']} faces, "
        f"reference view PSNR {summary['reference_psnr']} dB / mask IoU "
        f"{summary['reference_iou']}, {summary['steps']} steps in {summary['seconds']} s"
    )
    return 0
