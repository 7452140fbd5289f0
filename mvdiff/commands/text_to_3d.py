"""``mvdiff text-to-3d``: a prompt -> a 3D asset via multi-view SDS (docs/design.md §6, §9)."""

from __future__ import annotations

import argparse
import errno

from mvdiff.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from mvdiff.config import add_config_arguments, add_quiet_argument, add_resume_argument

    p = sub.add_parser(
        "text-to-3d",
        help="optimise a 3D asset from a text prompt with multi-view SDS",
        description="Optimise a radiance field with multi-view score distillation from a "
        "multi-view model (and/or posed reference views). Writes into --output: mesh.glb "
        "(UV-textured), mesh.obj + mesh.mtl + mesh_albedo.png, mesh.ply (vertex colours; all "
        "+Y up), turntable.gif, views.png and "
        "view_00..03.png (the final 4 views), checkpoint.pt (--resume continues), config.json, "
        "summary.json (mesh, PSNR / silhouette IoU / Chamfer metrics, seconds per stage). Settings: a preset (default: 24 GB GPU; --fast: CPU), then --config "
        "FILE, then --set KEY=VALUE, then the flags below.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="diffusers folder, official checkpoint or hub id (not needed with --sds-weight 0)",
    )
    p.add_argument("--prompt", default=None, help="text prompt (not needed with --sds-weight 0)")
    p.add_argument(
        "--image",
        default=None,
        metavar="PHOTO",
        help="from a photo: the same as `mvdiff image-to-3d PHOTO` with the other arguments "
        "(its flags apply; see `mvdiff image-to-3d --help`)",
    )
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: empty)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--fast", action="store_true", help="CPU-friendly preset (600 steps, 32² renders)"
    )
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default 10000)")
    p.add_argument("--render-size", type=int, default=None, help="early render size (default 64)")
    p.add_argument("--samples", type=int, default=None, help="samples per ray (default 64)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default 50)")
    p.add_argument("--rescale", type=float, default=None, help="CFG rescale on x0 (default 0.5)")
    p.add_argument("--form", choices=["x0", "eps"], default=None, help="SDS form (default x0)")
    p.add_argument("--lr", type=float, default=None, help="grid learning rate (default 0.01)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--mesh-resolution", type=int, default=None, help="marching grid (default 128)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint period in steps")
    p.add_argument(
        "--ref-views",
        default=None,
        help="posed views: a multi-view shard (.tar; RGBA) or an `mvdiff sample` output folder "
        "(view_XX.png + cameras.json; RGB, mask from the background colour)",
    )
    p.add_argument(
        "--ref-fov",
        type=float,
        default=None,
        help="field of view (deg) for --ref-views folders whose cameras.json has none (default 40)",
    )
    p.add_argument(
        "--ref-mask",
        choices=["auto", "none"],
        default=None,
        help="mask loss on --ref-views: auto (alpha, or estimated for RGB views) | none",
    )
    p.add_argument(
        "--shading",
        choices=["albedo", "lambertian", "textureless", "random"],
        default=None,
        help="shading of the SDS renders (default albedo; random = DreamFusion-style mix)",
    )
    p.add_argument(
        "--background",
        choices=["solid", "env"],
        default=None,
        help="background: solid colour with random-colour augmentation | env (direction MLP)",
    )
    p.add_argument("--ref-uid", default=None, help="sample of --ref-views to use (default: first)")
    p.add_argument(
        "--ref-weight", type=float, default=None, help="RGB+mask loss weight (default 1)"
    )
    p.add_argument(
        "--sds-weight",
        type=float,
        default=None,
        help="SDS weight (default 1; 0 = plain reconstruction)",
    )
    p.add_argument(
        "--representation",
        choices=["field", "gaussians"],
        default=None,
        help="3D representation: field (radiance field, default) | gaussians (3D Gaussian "
        "splatting; also writes gaussians.ply in the 3DGS layout; albedo shading only)",
    )
    p.add_argument(
        "--ref-holdout",
        default=None,
        metavar="I,J,...",
        help="--ref-views indices left out of the fit and scored in summary.json (e.g. 3,11)",
    )
    p.add_argument(
        "--ref-mesh",
        default=None,
        help="the asset --ref-views was rendered from (.glb/.gltf/.obj/.ply/.stl): Chamfer "
        "distance of the mesh in summary.json",
    )
    p.add_argument(
        "--mesh-texture",
        choices=["uv", "vertex"],
        default=None,
        help="mesh colours: uv (UV atlas + baked albedo PNG; default) | vertex (per vertex)",
    )
    p.add_argument(
        "--refine",
        action="store_true",
        help="after the field stage, refine its mesh (Magic3D-style): vertex offsets and the "
        "UV texture optimised with the same losses through a differentiable rasteriser at the "
        "reference views' resolution; writes refined.glb / refined.obj / refined.ply and "
        "summary.json's refine metrics",
    )
    p.add_argument(
        "--refine-from",
        default=None,
        metavar="MESH",
        help="skip the field stage and refine this mesh (.glb/.gltf/.obj/.ply/.stl in the run's "
        "frame, e.g. a previous run's mesh.glb)",
    )
    p.add_argument("--refine-steps", type=int, default=None, help="mesh stage steps (default 300)")
    add_config_arguments(p, "TextTo3DConfig (YAML or JSON)", "sds.guidance_scale=30")
    add_resume_argument(p, "OUTPUT/checkpoint.pt", "OUTPUT/checkpoint.pt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_quiet_argument(p)
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)  # old: no bar
    p.set_defaults(run=run)


def image_alias(argv: list[str]) -> list[str]:
    """``text-to-3d ... --image PHOTO ...`` -> ``image-to-3d PHOTO ...``: ``--image`` is an
    alias of ``mvdiff image-to-3d`` (one code path; that command's flags and checks apply).
    Any other ``argv`` is returned unchanged."""
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)
    if i is None or argv[i] != "text-to-3d":  # the first word is the command
        return argv
    rest = argv[i + 1 :]
    for j, a in enumerate(rest):
        if a == "--":
            break
        if a == "--image" and j + 1 < len(rest):
            photo, rest = rest[j + 1], rest[:j] + rest[j + 2 :]
        elif a.startswith("--image="):
            photo, rest = a.split("=", 1)[1], rest[:j] + rest[j + 1 :]
        else:
            continue
        return [*argv[:i], "image-to-3d", photo, *rest]
    return argv


def load_sds_config(cls, args: argparse.Namespace, positive: tuple, weights: tuple):
    """``cls`` (TextTo3DConfig or a subclass) from the preset (default or --fast), then
    --config, then --set, then the flags text-to-3d and image-to-3d share: the prompts, the
    ``positive`` numbers, --guidance and the non-negative loss ``weights``. Not checked yet."""
    from mvdiff.config import load_config

    preset = cls.fast() if args.fast else cls()
    config = load_config(
        cls, args.config, args.overrides, base=preset, validate=False, what="--config"
    )
    if args.prompt is not None:
        config.prompt = args.prompt
    if args.negative_prompt is not None:
        config.negative_prompt = args.negative_prompt
    for name in positive:
        value = getattr(args, name)
        if value is not None:
            if value <= 0 and name != "seed":
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
            setattr(config, name, value)
    if args.steps is not None:
        config.sds.anneal_steps = args.steps
        config.hires_after = min(config.hires_after, args.steps)
    if args.guidance is not None:
        config.sds.guidance_scale = args.guidance
    for name in weights:
        value = getattr(args, name)
        if value is not None:
            if value < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
            setattr(config, name, value)
    return config


def load_prior(args: argparse.Namespace, config):
    """(the SDS prior's pipeline from ``--model``, or None without SDS; the device of
    ``--device``, ``auto`` -> CUDA when there is one)."""
    import torch

    from mvdiff.pipelines.loading import load_pipeline

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = None
    if config.sds_weight > 0:
        pipe, _ = load_pipeline(args.model, torch.float32)
        pipe.to(device)
    return pipe, device


def resolve_config(args: argparse.Namespace):
    """Preset (default or --fast), then --config, then --set, then the flags; checked."""
    from pathlib import Path

    from mvdiff.config import validate_config
    from mvdiff.sds.text_to_3d import TextTo3DConfig

    config = load_sds_config(
        TextTo3DConfig,
        args,
        ("steps", "render_size", "samples", "lr", "seed", "mesh_resolution", "save_every"),
        ("ref_weight", "sds_weight"),
    )
    if args.rescale is not None:
        if not 0 <= args.rescale <= 1:
            raise UserError(f"--rescale must be in [0, 1], got {args.rescale}")
        config.sds.rescale = args.rescale
    if args.ref_views is not None:
        config.ref_views = args.ref_views
    if args.ref_uid is not None:
        config.ref_uid = args.ref_uid
    if config.sds_weight == 0 and not config.ref_views:
        raise UserError("--sds-weight 0 needs --ref-views (nothing to optimise otherwise)")
    if args.form is not None:
        config.sds.form = args.form
    if args.ref_holdout is not None:
        try:
            config.ref_holdout = [int(i) for i in args.ref_holdout.split(",") if i.strip()]
        except ValueError:
            raise UserError(
                f"--ref-holdout {args.ref_holdout!r}: expected indices like 3,11"
            ) from None
    if args.ref_mesh is not None:
        config.ref_mesh = args.ref_mesh
    if config.ref_mesh and not Path(config.ref_mesh).is_file():
        raise UserError(f"--ref-mesh {config.ref_mesh}: no such file")
    if args.mesh_texture is not None:
        config.mesh_texture = args.mesh_texture
    if args.refine:
        config.refine.enabled = True
    if args.refine_from is not None:
        if not Path(args.refine_from).is_file():
            raise UserError(f"--refine-from {args.refine_from}: no such file")
        config.refine.from_mesh = args.refine_from
    if args.refine_steps is not None:
        if args.refine_steps <= 0:
            raise UserError(f"--refine-steps must be positive, got {args.refine_steps}")
        config.refine.steps = args.refine_steps
    if args.ref_fov is not None:
        if not 0 < args.ref_fov < 180:
            raise UserError(f"--ref-fov must be in (0, 180), got {args.ref_fov}")
        config.ref_fov_deg = args.ref_fov
    if args.ref_mask is not None:
        config.ref_mask = args.ref_mask
    if args.shading is not None:
        config.shading = args.shading
    if args.background is not None:
        config.background.mode = args.background
    if args.representation is not None:
        config.representation = args.representation
    if config.sds_weight > 0 and not args.model:
        raise UserError("--model is required (unless --sds-weight 0 with --ref-views)")
    if config.sds_weight > 0 and not config.prompt.strip():
        raise UserError("--prompt is required and must not be empty (unless --sds-weight 0)")
    if config.ref_views and not Path(config.ref_views).exists():
        raise UserError(f"--ref-views {config.ref_views}: no such shard file or sample folder")
    return validate_config(config)


def resume_flag(args: argparse.Namespace) -> bool:
    """``--resume`` (or ``--resume latest``) continues from OUTPUT/checkpoint.pt, the one
    checkpoint a run keeps; ``--resume PATH`` must name that file."""
    from pathlib import Path

    if args.resume is None:
        return False
    if args.resume != "latest":
        wanted = Path(args.output) / "checkpoint.pt"
        given = Path(args.resume)
        if given.resolve() not in (wanted.resolve(), Path(args.output).resolve()):
            raise UserError(
                f"--resume {args.resume}: a run resumes from its own {wanted} (give --output "
                "the folder that holds the checkpoint)"
            )
    return True


#: errno values of a write that failed for want of room or permission to write (one line).
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mvdiff.sds.text_to_3d import text_to_3d

    config = resolve_config(args)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UserError(f"--output {args.output}: exists and is not a folder")
    pipe, device = load_prior(args, config)
    try:
        summary = text_to_3d(
            pipe, config, args.output, resume=resume_flag(args), progress=not (args.quiet or args.no_progress),
            device=device,
        )  # fmt: skip
    except OSError as e:
        if e.errno not in NO_ROOM:
            raise
        raise UserError(
            f"--output {args.output}: cannot write {Path(e.filename or '').name} ({e.strerror}); "
            "nothing half-written is left, the last checkpoint is kept (--resume continues)"
        ) from None
    print(
        f"wrote {args.output}: mesh {summary['vertices']} vertices / {summary['faces']} faces, "
        f"{summary['steps']} steps in {summary['seconds']} s"
    )
    if "refine" in summary:
        stage = summary["refine"]
        print(
            f"refined mesh (refined.glb): {stage['mesh']['vertices']} vertices / "
            f"{stage['mesh']['faces']} faces, {stage['steps']} steps; metrics {stage['metrics']}"
        )
    return 0
