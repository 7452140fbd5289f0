"""``mvdiff convert``: an official MVDream checkpoint -> a diffusers-format folder."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from mvdiff.config import add_quiet_argument

    p = sub.add_parser(
        "convert",
        help="convert an official MVDream / ImageDream checkpoint to a diffusers folder",
        description="Convert an official MVDream or ImageDream checkpoint (.pt/.ckpt/"
        ".safetensors, loaded as tensors only) into a diffusers-format folder that "
        "MVDreamPipeline.from_pretrained loads (ImageDream adds image_encoder/ and "
        "feature_extractor/).",
    )
    p.add_argument("checkpoint", help="official checkpoint, e.g. sd-v2.1-base-4view.pt")
    p.add_argument(
        "output_dir",
        nargs="?",
        metavar="OUTPUT",
        help="new folder to write (must not exist or be empty); or give it as --output",
    )
    p.add_argument("--output", metavar="DIR", help="the same as the OUTPUT argument")
    p.add_argument(
        "--original-config",
        default=None,
        help="official-style YAML (mvdream/configs/*.yaml, imagedream/configs/*.yaml) or a "
        "preset: sd-v2.1-base-4view, sd-v1.5-4view, sd-v2.1-base-4view-ipmv (default: inferred "
        "from the weights)",
    )
    p.add_argument("--unet-only", action="store_true", help="the checkpoint holds just the UNet")
    p.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="saved dtype"
    )
    add_quiet_argument(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from mvdiff.convert import convert_mvdream_checkpoint
    from mvdiff.errors import UserError

    if args.output_dir and args.output and args.output_dir != args.output:
        raise UserError(f"--output {args.output} and OUTPUT {args.output_dir} differ; give one")
    args.output_dir = args.output_dir or args.output
    if not args.output_dir:
        raise UserError("--output is required (the new diffusers folder)")
    t0 = time.perf_counter()
    print(f"converting {args.checkpoint} -> {args.output_dir}", flush=True)
    report = convert_mvdream_checkpoint(
        args.checkpoint,
        args.output_dir,
        original_config=args.original_config,
        unet_only=args.unet_only,
        dtype=getattr(torch, args.dtype),
    )
    print(
        f"unet: {report.unet_tensors} tensors, vae: {report.vae_tensors}, "
        f"text encoder: {report.text_encoder_tensors}"
        + (
            f", image encoder: {report.image_encoder_tensors}"
            if report.image_encoder_tensors
            else ""
        )
    )
    for line in report.dropped:
        print(f"dropped on purpose: {line}")
    if report.schedule_max_abs_error is not None:
        print(
            f"schedule buffers match the scheduler (max abs error {report.schedule_max_abs_error:.1e})"
        )
    print(f"wrote {args.output_dir} in {time.perf_counter() - t0:.1f} s")
    return 0
