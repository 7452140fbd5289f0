"""``mvdiff eval``: multi-view metrics of ``mvdiff sample`` folders, as JSON and a report.

::

    mvdiff eval samples/teddy samples/car --output eval/ \\
        [--gt renders/mv-000000.tar] [--clip clip-vit-b32/] [--inception pt_inception.pt]

Writes ``results.json``, ``report.html``, ``report.png`` and ``strips/NAME.png`` into
``--output``; prints the summary as one JSON line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mvdiff.errors import UserError

# flag -> (EvalConfig field, type, help)
_FLAGS = {
    "--gt": ("gt", "list", "ground truth: a multi-view shard (.tar) or a folder of views + "
             "cameras.json; one for all samples or one per sample (render it at a sample's "
             "cameras with `mvdiff render ASSET --cameras-from SAMPLE_DIR`)"),
    "--gt-uid": ("gt_uid", "list", "shard sample(s) to use as ground truth (default: those "
                 "captioned with the sample's prompt, scored against the closest; or the "
                 "shard's only sample)"),
    "--match-tolerance": ("match_tolerance_deg", float, "max angle (deg) between a view and its "
                          "ground-truth camera (default 5)"),
    "--fov": ("fov", float, "field of view (deg) for cameras without one; mvdiff sample stores "
              "none (default 40, the camera is put at the framing distance)"),
    "--recon-steps": ("recon_steps", int, "steps of each radiance-field fit (default 150)"),
    "--recon-resolution": ("recon_resolution", int, "fit size (default: the views', at most 64)"),
    "--holdout": ("holdout", str, "held-out-view variant: none | one (view 1, default) | all "
                  "(leave-one-out, one fit per view)"),
    "--seed": ("seed", int, "seed of the fits and KID subsets (default 0)"),
    "--clip": ("clip", str, "local CLIPModel folder (save_pretrained layout) for the CLIP score"),
    "--inception": ("inception", str, "local feature network for FID/KID: TorchScript file, "
                    "or inception_v3 state dict (needs torchvision); 'torchvision' "
                    "downloads (--allow-download)"),
    "--fid-reference": ("fid_reference", "list", "reference images for FID/KID (folders or "
                        "tars; default: the ground-truth views)"),
    "--feature-size": ("feature_size", int, "images are resized to this before the feature "
                       "network (default 299; 0 = as they are)"),
    "--feature-input": ("feature_input", str, "value range the feature network expects: auto | "
                        "unit | imagenet | uint8 | symmetric"),
    "--kid-subset-size": ("kid_subset_size", int, "KID subset size (default 1000)"),
    "--kid-subsets": ("kid_subsets", int, "KID subsets (default 100)"),
    "--threads": ("threads", int, "torch threads (default 1)"),
    "--device": ("device", str, "where the fits, CLIP and the feature network run: cpu "
                 "(default), cuda, cuda:N"),
}  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    from mvdiff.config import add_config_arguments, add_quiet_argument

    p = sub.add_parser(
        "eval",
        help="multi-view metrics of sampled views (consistency, ground truth, CLIP, FID/KID)",
        description="Score `mvdiff sample` output folders: reconstruction consistency (one "
        "radiance field fitted to the views at their cameras; PSNR on all views and on "
        "held-out views), PSNR/SSIM against ground-truth renders at the same cameras, CLIP "
        "score and FID/KID with local weights. Writes results.json and an HTML/PNG report.",
    )
    p.add_argument("samples", nargs="+", metavar="SAMPLE_DIR",
                   help="mvdiff sample output folder(s), or folders holding several")  # fmt: skip
    p.add_argument("--output", required=True, help="report folder")
    for flag, (field, tp, help_) in _FLAGS.items():
        if tp == "list":
            p.add_argument(flag, dest=field, action="append", default=None,
                           help=help_ + " (repeat the flag for several)")  # fmt: skip
        else:
            p.add_argument(flag, dest=field, type=tp, default=None, help=help_)
    p.add_argument("--allow-download", action="store_true",
                   help="allow fetching CLIP / Inception weights from the internet")  # fmt: skip
    add_config_arguments(p, "EvalConfig", "recon_steps=300")
    add_quiet_argument(p)
    p.set_defaults(run=run)


def expand_samples(paths: list[str]) -> list[str]:
    """Sample folders as given; a folder without cameras.json stands for its sub-folders
    that have one."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_dir():
            raise UserError(f"SAMPLE_DIR {p}: not a folder")
        if (path / "cameras.json").is_file():
            out.append(str(path))
            continue
        subs = sorted(str(s) for s in path.iterdir() if (s / "cameras.json").is_file())
        if not subs:
            raise UserError(f"SAMPLE_DIR {p}: no cameras.json here or in its sub-folders "
                            "(expected `mvdiff sample` output)")  # fmt: skip
        out += subs
    return out


def build_config(args: argparse.Namespace):
    """Defaults <- --config <- --set <- the flags given; validated (EvalConfig.validate)."""
    from mvdiff.config import config_from_args
    from mvdiff.eval.evaluate import EvalConfig

    flags = {flag: (field, getattr(args, field)) for flag, (field, _, _) in _FLAGS.items()}
    flags["SAMPLE_DIR"] = ("samples", expand_samples(args.samples))
    flags["--output"] = ("output", args.output)
    flags["--allow-download"] = ("allow_download", True if args.allow_download else None)
    return config_from_args(EvalConfig, args, flags)


def run(args: argparse.Namespace) -> int:
    import json
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "0" if args.allow_download else "1")
    from mvdiff.eval.evaluate import evaluate
    from mvdiff.eval.report import json_safe

    cfg = build_config(args)
    results = evaluate(cfg, progress=not args.quiet)
    print(f"wrote {results['files']['html']} and {results['files']['results']}", flush=True)
    print(
        json.dumps(json_safe({"summary": results["summary"], "seconds": results["seconds"]})),
        flush=True,
    )
    return 0
