"""SDS step speed on CPU: iterations/s at 64² and 256² renders, and where the time goes.

One SDS step = render a 4-view group (grid field, occupancy skipping, stratified samples) ->
upsample to the model resolution -> VAE encode -> UNet (cond + uncond in one batch) -> x0
SDS loss -> backward through the VAE encoder and the renderer -> Adam. Timed parts: render
forward, VAE encode forward, UNet forward, backward to the renders (VAE encoder backward),
render backward, optimiser. "outside" = everything but the UNet and the VAE (forward and
backward), as a share of the step.

``--model tiny`` (default) uses ``mvdiff.testing.tiny_components()``; ``--model full`` a
random-weight full-size SD-2.1 multi-view UNet and SD VAE (slow on a CPU: use few steps).
Prints one JSON line per render size, then one for posed-view reconstruction
(:func:`mvdiff.sds.recon.reconstruct_from_views`: 4 views at 64², random ray batches, the loop
of ``mvdiff text-to-3d --ref-views ... --sds-weight 0``; ``--recon-steps 0`` skips it), run
twice: with the per-tensor Adam of before (``before_unfused_adam``: seconds to the same step
count, PSNR reached) and with the fused Adam now used. Each
line carries the 1-minute load average: on a shared machine the numbers are lower bounds.

``--compare-steps N`` (issues 19 and 23) adds, per bundled asset (``--compare-assets``,
rendered by Blender: 8 views at 64², elevations 15/40, views 1 and 6 held out), one row per
fit: the radiance field as before (``render_packed: false``, the dense [rays, samples]
compositing), the field now (packed compositing of the samples the occupancy grid keeps) and
3D Gaussians. Each row: training seconds (evaluation excluded; wall clock and this process's
CPU seconds, which a shared machine disturbs less), final held-out PSNR, seconds to reach the
fast field's final held-out PSNR (``time_to_field_psnr`` / ``cpu_to_field_psnr``), and the
silhouette IoU of the mesh against the alpha of all 8 views. Both fields run N steps, the
Gaussians ``--gaussian-steps`` (stopping early with ``--stop-at-target``). A ``goal`` entry
gives the Gaussians' time to the field's PSNR as a fraction of the field's N-step time (issue
19's goal: <= 1/3). The first stderr line names the CPU and the instruction set torch used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def build(model: str):
    from mvdiff.testing import ddim_scheduler, tiny_components

    if model == "tiny":
        c = tiny_components()
        return c["unet"], c["vae"], ddim_scheduler().alphas_cumprod, 32
    from diffusers import AutoencoderKL

    from mvdiff.models import PRESETS, MultiViewUNet2DConditionModel
    from mvdiff.models.unet_mv import multiview_unet_config

    torch.manual_seed(0)
    unet = MultiViewUNet2DConditionModel.from_config(
        multiview_unet_config(sample_size=32, **dict(PRESETS["sd-v2.1-base-4view"]))
    ).eval()
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
    ).eval()
    return unet, vae, ddim_scheduler().alphas_cumprod, 1024


def bench(model: str, size: int, steps: int, samples: int) -> dict:
    from mvdiff.cameras import sample_sds_group
    from mvdiff.sds import FieldConfig, MultiViewSDS, OccupancyGrid, RadianceField, SDSConfig
    from mvdiff.sds import render as render_views

    unet, vae, ac, ctx = build(model)
    timers = {"unet": 0.0, "encode": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            timers[key] += time.perf_counter() - t
            return out

        return wrapper

    sds = MultiViewSDS(timed(unet, "unet"), vae, ac, SDSConfig())
    sds.unet.config = unet.config
    vae.encode = timed(vae.encode, "encode")
    field = RadianceField(FieldConfig())
    opt = torch.optim.Adam(field.parameters(), lr=0.01)
    occ = OccupancyGrid(field.bound, 32)
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 77, ctx)
    uncond = torch.zeros(1, 77, ctx)
    rows = []
    for step in range(steps + 1):  # the first step is a warm-up
        timers.update(unet=0.0, encode=0.0)
        t0 = time.perf_counter()
        if step % 16 == 0:
            occ.update(field, gen)
        g = sample_sds_group(gen)
        out = render_views(
            field, g["c2w"], g["fov_deg"], size, samples, stratified=True, generator=gen,
            occupancy=occ,
        )  # fmt: skip
        t1 = time.perf_counter()
        res = sds(out["rgb"], cond, uncond, g["camera"], step=step, generator=gen)
        t2 = time.perf_counter()
        (grad_rgb,) = torch.autograd.grad(res["loss"], out["rgb"], retain_graph=True)
        t3 = time.perf_counter()
        opt.zero_grad()
        out["rgb"].backward(grad_rgb)
        t4 = time.perf_counter()
        opt.step()
        t5 = time.perf_counter()
        if step:
            rows.append(
                dict(
                    total=t5 - t0, render_fwd=t1 - t0, encode_fwd=timers["encode"],
                    unet_fwd=timers["unet"], vae_bwd=t3 - t2, render_bwd=t4 - t3, optim=t5 - t4,
                )
            )  # fmt: skip
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    model_time = med["unet_fwd"] + med["encode_fwd"] + med["vae_bwd"]
    return {
        "model": model,
        "render_size": size,
        "model_resolution": sds.resolution,
        "samples_per_ray": samples,
        "steps": steps,
        "it_per_s": round(1.0 / med["total"], 3),
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "outside_unet_vae_share": round(1.0 - model_time / med["total"], 3),
        "threads": torch.get_num_threads(),
        "load_avg_1min": _load(),
    }


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def bench_recon(steps: int, fused_adam: bool = True, field: str = "small") -> dict:

    import numpy as np

    from mvdiff.cameras import framing_distance, orbit_c2w
    from mvdiff.sds.config import TextTo3DConfig
    from mvdiff.sds.field import FieldConfig
    from mvdiff.sds.oracle import ReferenceObject
    from mvdiff.sds.recon import reconstruct_from_views
    from mvdiff.sds.render import render

    fov, res = 40.0, 64
    dist = framing_distance(fov)
    el, az = np.array([15.0] * 4 + [30.0]), np.array([0.0, 90.0, 180.0, 270.0, 45.0])
    c2w = torch.from_numpy(orbit_c2w(el, az, dist)).float()
    with torch.no_grad():
        out = render(ReferenceObject(), c2w, fov, res, 64, background=torch.zeros(3))
    a = out["opacity"]
    rgba = torch.cat([out["rgb"] / a.clamp(min=1e-6), a], 1).clamp(0, 1)  # straight alpha
    t0 = time.perf_counter()
    config = TextTo3DConfig.reconstruction(fused_adam=fused_adam)
    if field == "default":  # the grids of the default preset (16..128³), as `mvdiff text-to-3d`
        config.field = FieldConfig()
    r = reconstruct_from_views(rgba, c2w, fov, steps=steps, holdout=[4], config=config)
    seconds = time.perf_counter() - t0
    cfg = r["config"]
    return {
        "mode": "reconstruct_from_views",
        "fused_adam": fused_adam,
        "field": field,
        "views": 4,
        "resolution": res,
        "rays_per_step": cfg.ref_rays,
        "samples_per_ray": cfg.samples,
        "steps": steps,
        "seconds_total": round(seconds, 2),
        "it_per_s": round(steps / seconds, 2),
        "psnr_train": round(r["psnr_train"], 2),
        "psnr_holdout": round(r["psnr_holdout"], 2),
        "threads": torch.get_num_threads(),
        "load_avg_1min": _load(),
    }


def render_asset(name: str, folder, res: int = 64) -> str:
    """Blender renders of a bundled asset (tests/fixtures/assets): a shard path."""
    from pathlib import Path

    from mvdiff.render.config import RenderConfig
    from mvdiff.render.runner import render_objects

    assets = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "assets"
    cfg = RenderConfig(
        inputs=[str(assets / name)], output=str(folder), rig="orbit", views=8,
        elevations=[15.0, 40.0] * 4, fov=40.0, resolution=res, samples=16, workers=1,
        timeout=300.0,
    )  # fmt: skip
    if render_objects(cfg, progress=False)["done"] != 1:
        raise RuntimeError(f"could not render {name}")
    return str(next(Path(folder).glob("*.tar")))


def cpu_info() -> dict:
    """The CPU this run used: model, the vector extensions it has, and torch's choice."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = None
    return {
        "cpu": model, "cores": os.cpu_count(), "features": [f for f in wanted if f in flags],
        "torch_capability": capability, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }  # fmt: skip


def bench_compare(asset: str, representation: str, steps: int, eval_every: int, res: int = 64,
                  packed: bool = True, stop_at: float | None = None):  # fmt: skip
    """One row of the field / Gaussians comparison (module docstring); ``stop_at``: stop
    training at the first evaluation at or above this held-out PSNR."""
    import tempfile

    from mvdiff.sds.config import TextTo3DConfig
    from mvdiff.sds.loop import make_fit_state, run_steps
    from mvdiff.sds.recon import psnr, render_fit, silhouette_iou
    from mvdiff.sds.ref_views import composite, load_shard_sample
    from mvdiff.sds.silhouette import mesh_silhouettes

    with tempfile.TemporaryDirectory() as tmp:
        views = load_shard_sample(render_asset(asset, tmp, res))
    holdout, train = [1, 6], [0, 2, 3, 4, 5, 7]
    cfg = TextTo3DConfig.reconstruction(
        steps=steps, representation=representation, render_packed=packed
    )
    bg = torch.tensor(cfg.background.color)
    fit = make_fit_state(cfg)
    ref = fit.prepare_ref(views, res, train)
    target = composite(views["rgba"][holdout], bg)
    curve, seconds, cpu = [], 0.0, 0.0
    for start in range(0, steps, eval_every):
        t0, c0 = time.perf_counter(), time.process_time()
        run_steps(fit, cfg, start, min(start + eval_every, steps), rays=ref, progress=False)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        rgb, _ = render_fit(fit, views["c2w"][holdout], views["fov_deg"][holdout], res, bg)
        p = round(psnr(rgb, target), 2)
        curve.append((min(start + eval_every, steps), round(seconds, 2), p, round(cpu, 2)))
        if stop_at is not None and p >= stop_at:
            break
    verts, faces, _ = fit.mesh(64)
    sil = mesh_silhouettes(verts, faces, views["c2w"], views["fov_deg"], res)
    return {
        "mode": "compare", "asset": asset, "representation": representation,
        "render_packed": packed if representation == "field" else None, "steps": curve[-1][0],
        "resolution": res, "train_views": len(train), "seconds_train": round(seconds, 2),
        "cpu_seconds_train": round(cpu, 2),
        "psnr_holdout": curve[-1][2], "mesh_iou": round(silhouette_iou(sil, views["rgba"][:, 3:4]), 3),
        "curve": curve, "threads": torch.get_num_threads(), "load_avg_1min": _load(),
    }  # fmt: skip


def time_to(curve, target: float, cpu: bool = False):
    """Training seconds (wall, or CPU with ``cpu``) of the first evaluation at or above
    ``target`` dB (None if never)."""
    return next((c if cpu else sec for _, sec, p, c in curve if p >= target), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "full"], default="tiny")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--recon-steps", type=int, default=200, help="0: skip the reconstruction line")
    p.add_argument("--compare-steps", type=int, default=0, help="field steps of the field / "
                   "Gaussians comparison on bundled assets (0: skip it)")  # fmt: skip
    p.add_argument("--gaussian-steps", type=int, default=200,
                   help="Gaussian steps (the reconstruction preset's schedules scale to them)")  # fmt: skip
    p.add_argument("--compare-assets", nargs="+", default=["monkey.glb"])
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--stop-at-target", action="store_true",
                   help="stop the Gaussians once they reach the field's held-out PSNR")  # fmt: skip
    p.add_argument("--recon-field", choices=["small", "default"], default="small",
                   help="reconstruction grids: the CPU preset's (12..48³) or the default (16..128³)")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"bench": "sds", "model": args.model, "machine": cpu_info(), "sds": []}
    print(f"# {json.dumps(result['machine'])}", file=sys.stderr, flush=True)
    for size in args.sizes:
        row = bench(args.model, size, args.steps, args.samples)
        print(f"# {json.dumps(row)}", file=sys.stderr, flush=True)
        result["sds"].append(row)
    if args.recon_steps > 0:
        # Before (per-tensor Adam) and after (fused Adam) in the same run: time to the same
        # step count and the PSNR reached there.
        before = bench_recon(args.recon_steps, fused_adam=False, field=args.recon_field)
        result["reconstruction"] = bench_recon(args.recon_steps, field=args.recon_field)
        result["reconstruction"]["before_unfused_adam"] = {
            k: before[k] for k in ("seconds_total", "it_per_s", "psnr_holdout", "load_avg_1min")
        }
    if args.compare_steps > 0:
        result["compare"] = []
        result["goal"] = []
        for asset in args.compare_assets:
            n, every = args.compare_steps, args.eval_every
            before = bench_compare(asset, "field", n, every, packed=False)
            field = bench_compare(asset, "field", n, every, packed=True)
            target = field["psnr_holdout"]
            stop = target if args.stop_at_target else None
            gs = bench_compare(asset, "gaussians", args.gaussian_steps, every, stop_at=stop)
            for row in (before, field, gs):
                row["time_to_field_psnr"] = time_to(row["curve"], target)
                row["cpu_to_field_psnr"] = time_to(row["curve"], target, cpu=True)
                print(f"# {json.dumps(row)}", file=sys.stderr, flush=True)
                result["compare"].append(row)

            def frac(a, b):
                return None if a is None or not b else round(a / b, 3)

            goal = {
                "asset": asset, "field_psnr": target,
                "field_speedup_wall": frac(before["seconds_train"], field["seconds_train"]),
                "field_speedup_cpu": frac(before["cpu_seconds_train"], field["cpu_seconds_train"]),
                "gaussians_fraction_wall": frac(gs["time_to_field_psnr"], field["seconds_train"]),
                "gaussians_fraction_cpu": frac(gs["cpu_to_field_psnr"], field["cpu_seconds_train"]),
                "gaussians_fraction_cpu_vs_before": frac(
                    gs["cpu_to_field_psnr"], before["cpu_seconds_train"]
                ),
            }  # fmt: skip
            print(f"# {json.dumps(goal)}", file=sys.stderr, flush=True)
            result["goal"].append(goal)
    print(json.dumps(result), flush=True)  # one JSON line, like every benchmark


if __name__ == "__main__":
    main()
