"""Render cost on CPU: CPU-seconds per 256^2 view and per-object overhead; prints one JSON line.

One worker process per setting (samples 16/32/64 x denoiser on/off) renders the four test
assets with the MVDream rig. All numbers are CPU seconds, not wall time:

* per view: the median over views of the CPU time of each render call, measured inside the
  worker (``time.process_time``: all threads of the worker process);
* per-object overhead: what a job costs beyond ``V x per view`` (clear the previous asset,
  import, normalise, the first view's extra scene sync), median over objects;
* per worker: ``getrusage(RUSAGE_CHILDREN)`` over the worker's life minus its jobs (bpy
  import, scene set-up, exit); a worker serves ``recycle_every`` (50) objects;
* main-process validation of a 32-view sample (``getrusage(RUSAGE_SELF)``).

Objects/hour per core for the default recipe (32 views, 32 samples, denoiser) follow from
these. The machine may be shared: ``load_average`` is reported with the numbers.
Targets: <= 0.8 CPU-s per view at the default recipe, <= 0.3 s per-object overhead.

    python benchmarks/bench_render.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mvdiff.render.config import RenderConfig  # noqa: E402
from mvdiff.render.pool import WorkerHandle, run_job, worker_options  # noqa: E402
from mvdiff.render.rigs import make_rig  # noqa: E402
from mvdiff.render.shards import build_sample  # noqa: E402

ASSET_DIR = ROOT / "tests/fixtures/assets"
ASSETS = [ASSET_DIR / n for n in ("BoxTextured.glb", "monkey.glb", "capsule.obj", "rabbit.obj")]


def rusage_cpu(who) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_worker(cfg: RenderConfig, rounds: int = 1) -> dict:
    """One worker renders every asset ``rounds`` times with ``cfg.views`` views each."""
    handle = WorkerHandle(
        worker_options(cfg), timeout=600, startup_timeout=300, recycle_every=10**6
    )
    c0 = rusage_cpu(resource.RUSAGE_CHILDREN)
    out = {"view_cpu": [], "job_cpu": [], "job_views": [], "validate_cpu": []}
    for r in range(rounds):
        for path in ASSETS:
            uid = f"{path.stem}_{r}"
            rig = make_rig(cfg, uid)
            job = {
                "uid": uid,
                "path": str(path),
                "c2w": rig["c2w"].tolist(),
                "fov_deg": rig["fov_deg"],
            }
            answer = run_job(handle, job)
            if not answer.get("ok"):
                raise RuntimeError(f"{path.name}: {answer.get('reason')}")
            s0 = rusage_cpu(resource.RUSAGE_SELF)
            build_sample({"uid": uid}, answer, cfg)
            out["validate_cpu"].append(rusage_cpu(resource.RUSAGE_SELF) - s0)
            out["view_cpu"] += answer["view_cpu"]
            out["job_cpu"].append(answer["cpu"])
            out["job_views"].append(answer["view_cpu"])
    handle.close()
    out["worker_total"] = rusage_cpu(resource.RUSAGE_CHILDREN) - c0
    out["per_view"] = statistics.median(out["view_cpu"])
    out["overhead"] = statistics.median(
        job - len(views) * out["per_view"] for job, views in zip(out["job_cpu"], out["job_views"])
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="fewer views (a smoke run)")
    args = parser.parse_args()
    t_start = time.monotonic()
    load_before = os.getloadavg()[0]
    base = dict(resolution=args.resolution, output="unused")

    default = RenderConfig(**base, views=2 if args.quick else 4)
    ref = run_worker(default, rounds=1 if args.quick else 2)
    grid = {}
    for samples in (16, 32, 64):
        for denoise in (True, False):
            key = f"spp{samples}_{'denoise' if denoise else 'raw'}"
            if samples == default.samples and denoise == default.denoise:
                res = ref
            else:
                cfg = RenderConfig(
                    **base, samples=samples, denoise=denoise, views=1 if args.quick else 2
                )
                res = run_worker(cfg)
            grid[key] = {"cpu_s_per_view": round(res["per_view"], 3),
                         "overhead_cpu_s": round(res["overhead"], 3)}  # fmt: skip

    per_worker = ref["worker_total"] - sum(ref["job_cpu"])
    validate_32 = statistics.median(ref["validate_cpu"]) / default.views * 32
    per_object = ref["overhead"] + 32 * ref["per_view"] + validate_32 + per_worker / 50
    print(json.dumps({
        "bench": "render",
        "resolution": args.resolution,
        "assets": [p.name for p in ASSETS],
        "default_recipe": {"views": 32, "samples": default.samples, "denoise": default.denoise,
                           "denoise_quality": default.denoise_quality,
                           "noise_threshold": default.noise_threshold},
        "cpu_s_per_view": round(ref["per_view"], 3),
        "per_object_overhead_cpu_s": round(ref["overhead"], 3),
        "validate_cpu_s_per_32_view_object": round(validate_32, 3),
        "per_worker_cpu_s": round(per_worker, 3),
        "cpu_s_per_object_32_views": round(per_object, 2),
        "objects_per_hour_per_core": round(3600 / per_object, 1),
        "grid": grid,
        "targets": {"cpu_s_per_view": 0.8, "per_object_overhead_cpu_s": 0.3},
        "meets_targets": ref["per_view"] <= 0.8 and ref["overhead"] <= 0.3,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu_cores": os.cpu_count(),
        "wall_s": round(time.monotonic() - t_start, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
