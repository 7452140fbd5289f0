"""Does the exported mesh agree with the field and the asset? (issue 23) One run, one machine.

For each asset (default: the bundled ones in tests/fixtures/assets): render it with
``mvdiff render`` (16 views, 96², as a new user would), reconstruct it with ``mvdiff
text-to-3d --ref-views SHARD --sds-weight 0 --steps N`` (``--ref-mesh`` the asset, two views
held out), then print one JSON line per asset with the run's ``summary.json`` metrics (PSNR,
silhouette IoU of the mesh against the renders and against the field's opacity, Chamfer
distance to the source in the unit box, seconds per stage) next to the mesh the old extraction
(a fixed density level: a grid cell 50% opaque, every fragment kept) gives on the same field.

    python benchmarks/bench_mesh.py --work-dir /tmp/bench_mesh             # 600 steps, default preset
    python benchmarks/bench_mesh.py --steps 150 --preset reconstruct_cpu   # quicker

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
    args = p.parse_args(argv)

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
    for asset in assets:
        uid = asset.stem
        run = work / uid
        cmd = ["mvdiff", "text-to-3d", "--ref-views", str(shard), "--ref-uid", uid,
               "--sds-weight", "0", "--steps", str(args.steps), "--output", str(run),
               "--no-progress", "--ref-mesh", str(asset), "--ref-holdout", args.holdout]  # fmt: skip
        if args.preset == "reconstruct_cpu":
            cmd += ["--config", str(ROOT / "infer" / "configs" / "reconstruct_cpu.yaml")]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((run / "summary.json").read_text())
        ref = load_shard_sample(shard, uid)
        config = json.loads((run / "config.json").read_text())
        row = {
            "asset": uid, "steps": args.steps, "views": args.views, "res": args.resolution,
            **summary["metrics"], **old_extraction_iou(run, ref, config["mesh_resolution"]),
            "mesh": summary["mesh"], "stage_seconds": summary["stage_seconds"],
            "load1": round(os.getloadavg()[0], 2),
        }  # fmt: skip
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
