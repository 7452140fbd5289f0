"""Does the exported mesh agree with the field and the asset? (issue 23) One run, one machine.

For each asset (default: the bundled ones in tests/fixtures/assets): render it with
``mvdiff render`` (16 views, 96², as a new user would), reconstruct it with ``mvdiff
text-to-3d --ref-views SHARD --sds-weight 0 --steps N`` (``--ref-mesh`` the asset, two views
held out), then print one JSON line per asset with the run's ``summary.json`` metrics (PSNR,
silhouette IoU of the mesh against the renders and against the field's opacity, Chamfer
distance to the source in the unit box, seconds per stage) next to the mesh the old extraction
(a fixed density level: a grid cell 50% opaque, every fragment kept) gives on the same field.

With ``--refine-steps R`` (> 0) the run adds the mesh stage (``--refine``) and each line also
compares the three stages on the held-out views: ``field`` (the radiance field's renders),
``mesh`` (the extracted, UV-textured mesh) and ``refined`` (after the mesh stage): held-out
PSNR, silhouette IoU, Chamfer and seconds; a table of them follows the JSON lines.
``--figure PNG`` draws one row per asset (input render, field, extracted mesh, refined mesh,
the first held-out camera), as docs/mesh_stages.png.

    python benchmarks/bench_mesh.py --work-dir /tmp/bench_mesh             # 600 steps, default preset
    python benchmarks/bench_mesh.py --steps 150 --preset reconstruct_cpu   # quicker
    python benchmarks/bench_mesh.py --refine-steps 300 --figure docs/mesh_stages.png
    # docs/mesh_stages.png was made on the busy 2-core machine (7.4 min, load ~9) with
    OMP_NUM_THREADS=1 python benchmarks/bench_mesh.py --preset reconstruct_cpu --steps 60 \
        --refine-steps 20 --resolution 64 --jobs 2 --figure docs/mesh_stages.png

Each line carries the 1-minute load average: on a shared machine the seconds are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "fixtures" / "assets"


def old_extraction_iou(run: Path, ref: dict, resolution: int) -> dict:
    """Silhouette IoU of the old mesh (fixed level, no clean-up) of the run's field."""
    from mvdiff.sds.field import FieldConfig, RadianceField
    from mvdiff.sds.mesh import extract_mesh
    from mvdiff.sds.mesh_eval import mesh_silhouette_iou

    state = torch.load(run / "checkpoint.pt", weights_only=True)
    field = RadianceField(FieldConfig(**state["config"]["field"]))
    field.load_state_dict(state["field"])
    field.eval()
    level = float(np.log(2.0) / (2 * field.bound / (resolution - 1)))
    v, f, _ = extract_mesh(field, resolution, level=level, min_component=0)
    iou = mesh_silhouette_iou(v, f, ref["c2w"], ref["fov_deg"], ref["rgba"][:, 3:])
    return {"old_vertices": int(len(v)), "old_mesh_iou_ref": round(iou, 4)}


def stages(summary: dict) -> dict:
    """Field vs extracted mesh vs refined mesh on the held-out views (summary.json's numbers)."""
    m, r, sec = summary["metrics"], summary["refine"], summary["stage_seconds"]
    return {
        "field": {"psnr_holdout": m.get("psnr_holdout"), "iou_holdout": None,
                  "iou": m.get("field_iou_ref"), "chamfer": None, "seconds": sec["fit"]},
        "mesh": {"psnr_holdout": r["metrics_mesh"].get("psnr_holdout"),
                 "iou_holdout": r["metrics_mesh"].get("mesh_iou_ref_holdout"),
                 "iou": r["metrics_mesh"].get("mesh_iou_ref"),
                 "chamfer": r["metrics_mesh"].get("chamfer"),
                 "seconds": round(sec["mesh_extract"] + sec["mesh_texture"], 2)},
        "refined": {"psnr_holdout": r["metrics"].get("psnr_holdout"),
                    "iou_holdout": r["metrics"].get("mesh_iou_ref_holdout"),
                    "iou": r["metrics"].get("mesh_iou_ref"), "chamfer": r["metrics"].get("chamfer"),
                    "seconds": sec["refine_fit"]},
    }  # fmt: skip


@torch.no_grad()
def figure_row(run: Path, ref: dict, view: int, res: int, cell: int = 128) -> np.ndarray:
    """Input render, field, extracted mesh and refined mesh at reference camera ``view``,
    cropped to the object (with a margin) and resized to ``cell`` pixels: ``[cell, 4 cell, 3]``."""
    import torch.nn.functional as F
    from PIL import Image

    from mvdiff.sds.config import TextTo3DConfig
    from mvdiff.sds.field import FieldConfig, RadianceField
    from mvdiff.sds.mesh_fit import MeshFitState, load_base_mesh
    from mvdiff.sds.recon import render_views
    from mvdiff.sds.ref_views import composite

    config = TextTo3DConfig.from_dict(json.loads((run / "config.json").read_text()))
    bg = torch.tensor(config.background.color, dtype=torch.float32)
    c2w, fov = ref["c2w"][view : view + 1].float(), ref["fov_deg"][view : view + 1]
    rgba = F.interpolate(ref["rgba"][view : view + 1].float(), size=(res, res), mode="area")
    images = [composite(rgba, bg)]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    field = RadianceField(FieldConfig(**state["config"]["field"]))
    field.load_state_dict(state["field"])
    images.append(render_views(field.eval(), c2w, fov, res, config.samples, bg))
    for name in ("mesh.glb", "refined.glb"):
        fit = MeshFitState(config, load_base_mesh(run / name, config.texture_size))
        out = fit.render(c2w, fov, 2 * res, background=bg)["rgb"]  # (1, 3, 2R, 2R)
        images.append(F.avg_pool2d(out, 2))  # antialiased as the metrics
    alpha = rgba[0, 3] > 0.05  # (1, 4, R, R) -> (R, R)
    ys, xs = alpha.nonzero(as_tuple=True)
    half = int(max(ys.max() - ys.min(), xs.max() - xs.min()) * 0.6) + 4
    cy, cx = int(ys.float().mean()), int(xs.float().mean())
    box = (cx - half, cy - half, cx + half, cy + half)
    cells = []
    for img in images:
        arr = (img[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        pil = Image.fromarray(arr).crop(box).resize((cell, cell), Image.LANCZOS)
        cells.append(np.asarray(pil))
    return np.concatenate(cells, 1)  # 4 x (C, C, 3) -> (C, 4C, 3)


def write_figure(rows: list, path: Path, cell: int = 128) -> None:
    """The rows under a header naming the columns, as a PNG."""
    from PIL import Image, ImageDraw

    header = Image.new("RGB", (4 * cell, 18), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    for i, name in enumerate(("input render", "field", "extracted mesh", "refined mesh")):
        draw.text((i * cell + 6, 3), name, fill=(0, 0, 0))
    img = np.concatenate([np.asarray(header), *rows], 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, optimize=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("assets", nargs="*", help="asset files (default: the bundled ones)")
    p.add_argument("--work-dir", default="bench_mesh_out")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--views", type=int, default=16)
    p.add_argument("--resolution", type=int, default=96)
    p.add_argument("--preset", choices=["default", "reconstruct_cpu"], default="default",
                   help="default preset (the issue's command) or infer/configs/reconstruct_cpu.yaml")  # fmt: skip
    p.add_argument("--holdout", default="3,11")
    p.add_argument(
        "--refine-steps",
        type=int,
        default=0,
        help="add the mesh stage (--refine) with this many steps and compare stages",
    )
    p.add_argument("--figure", default=None, help="PNG of input / field / mesh / refined rows")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="assets reconstructed at once (seconds are then per-run upper bounds)",
    )
    args = p.parse_args(argv)
    if args.figure and args.refine_steps <= 0:
        p.error("--figure needs --refine-steps")

    from mvdiff.sds.ref_views import load_shard_sample

    work = Path(args.work_dir)
    assets = [Path(a) for a in args.assets] or sorted(
        x for x in ASSETS.iterdir() if x.suffix in (".glb", ".obj")
    )
    shard_dir = work / "shard"
    cmd = ["mvdiff", "render", *map(str, assets), "--output", str(shard_dir), "--views",
           str(args.views), "--resolution", str(args.resolution), "--samples", "16", "--quiet"]  # fmt: skip
    subprocess.run(cmd, check=True)
    (shard,) = sorted(shard_dir.glob("*.tar"))[:1]
    table, rows, cmds = [], [], {}
    for asset in assets:
        uid = asset.stem
        cmd = ["mvdiff", "text-to-3d", "--ref-views", str(shard), "--ref-uid", uid,
               "--sds-weight", "0", "--steps", str(args.steps), "--output", str(work / uid),
               "--no-progress", "--ref-mesh", str(asset), "--ref-holdout", args.holdout]  # fmt: skip
        if args.preset == "reconstruct_cpu":
            cmd += ["--config", str(ROOT / "infer" / "configs" / "reconstruct_cpu.yaml")]
        if args.refine_steps > 0:
            cmd += ["--refine", "--refine-steps", str(args.refine_steps)]
        cmds[uid] = cmd
    running, pending = [], list(cmds.values())
    while pending or running:  # at most --jobs runs at a time
        while pending and len(running) < max(args.jobs, 1):
            running.append(subprocess.Popen(pending.pop(0), stdout=subprocess.DEVNULL))
        running[0].wait()
        if running[0].returncode:
            raise SystemExit(f"{' '.join(running[0].args)}: exit {running[0].returncode}")
        running.pop(0)
    for asset in assets:
        uid = asset.stem
        run = work / uid
        summary = json.loads((run / "summary.json").read_text())
        ref = load_shard_sample(shard, uid)
        config = json.loads((run / "config.json").read_text())
        row = {
            "asset": uid, "steps": args.steps, "views": args.views, "res": args.resolution,
            **summary["metrics"], **old_extraction_iou(run, ref, config["mesh_resolution"]),
            "mesh": summary["mesh"], "stage_seconds": summary["stage_seconds"],
            "load1": round(os.getloadavg()[0], 2),
        }  # fmt: skip
        if args.refine_steps > 0:
            row["stages"] = stages(summary)
            table.append((uid, row["stages"]))
            if args.figure:
                view = int(args.holdout.split(",")[0])
                rows.append(figure_row(run, ref, view, summary["refine"]["render_size"]))
        print(json.dumps(row), flush=True)
    if table:
        print(f"{'asset':<12} {'stage':<8} {'PSNR held-out':>13} {'IoU':>6} {'IoU held-out':>12} "
              f"{'Chamfer':>8} {'seconds':>8}")  # fmt: skip
        for uid, st in table:
            for name, m in st.items():
                cells = [m["psnr_holdout"], m["iou"], m["iou_holdout"], m["chamfer"], m["seconds"]]
                text = ["-" if c is None else f"{c:g}" for c in cells]
                print(f"{uid:<12} {name:<8} {text[0]:>13} {text[1]:>6} {text[2]:>12} "
                      f"{text[3]:>8} {text[4]:>8}")  # fmt: skip
    if args.figure:
        write_figure(rows, Path(args.figure))
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
