"""Speed and memory of the full-size SD-2.1 multi-view UNet on CPU, against the official model.

Forward and forward+backward (a training step's model work) of the ``sd-v2.1-base-4view``
UNet with random weights, 4 views of 256² images (32² latents), 77 context tokens:

* ``official``: the official architecture and computation (``benchmarks/official_unet.py``,
  checked against the official reference vectors by ``tests/test_official_baseline.py``);
* ``mvdiff``: ``MultiViewUNet2DConditionModel`` with the same weights (converted);

in fp32 and bf16 (autocast, fp32 master weights: what ``accelerate --mixed_precision bf16``
does), with and without gradient checkpointing. Each configuration runs in its own process
(peak memory = that process's max RSS) with one warm-up step and the median of
``--repeats`` timed steps; official and mvdiff runs alternate so that machine noise hits
both alike. FLOPs are counted with ``torch.utils.flop_counter`` on the mvdiff model (the
same math for both) and reported as achieved FLOP/s and as a fraction of a dense matmul
peak measured on this machine in the same run.

bf16 is measured at full size only when the CPU has native bf16 (bf16 matmul at least as
fast as fp32); otherwise the JSON says why it was skipped and gives the two peaks.

Prints one JSON line. ``--quick`` uses a half-width model for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def matmul_peak(dtype_name: str, repeats: int = 5) -> float:
    """Best FLOP/s of square fp32/bf16 matmuls (1024², 2048²; 512² where bf16 is emulated)."""
    import torch

    dtype = getattr(torch, dtype_name)
    emulated = dtype == torch.bfloat16 and torch.backends.cpu.get_cpu_capability() in (
        "DEFAULT",
        "AVX2",
    )
    best = 0.0
    for n in [512] if emulated else [1024, 2048]:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


def unet_params(quick: bool) -> dict:
    from mvdiff.models import PRESETS

    params = dict(PRESETS["sd-v2.1-base-4view"])
    if quick:
        params.update(model_channels=160, num_head_channels=32, context_dim=512)
    return params


def child(spec: dict) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    sys.path.insert(0, str(HERE))
    from official_unet import OfficialMultiViewUNet

    from mvdiff.convert import build_unet

    torch.manual_seed(0)
    params = unet_params(spec["quick"])
    official = OfficialMultiViewUNet(**params)
    if spec["impl"] == "mvdiff":
        # The same weights, handed over rather than cloned: a cloned copy would put a second
        # set of weights into the process's peak RSS (ru_maxrss is a lifetime maximum).
        weights = official.state_dict()
        del official
        model = build_unet(weights, params)
        del weights
    else:
        model = official
    model.train(spec["mode"] == "train")
    if spec.get("checkpointing"):
        model.enable_gradient_checkpointing()
    v, res = spec["views"], spec["resolution"] // 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(v, 4, res, res, generator=g)
    t = torch.full((v,), 500)
    ctx = torch.randn(v, 77, params["context_dim"], generator=g)
    cam = torch.randn(v, 16, generator=g)
    autocast = spec["dtype"] == "bf16"

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if spec["impl"] == "mvdiff":
                return model(x, t, ctx, camera=cam, num_views=v).sample
            return model(x, t, ctx, camera=cam, num_frames=v)

    def step():
        if spec["mode"] == "forward":
            with torch.no_grad():
                forward()
        else:
            forward().float().square().mean().backward()
            model.zero_grad(set_to_none=True)

    step()  # warm-up
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flops = None
    if spec["impl"] == "mvdiff":  # counted after the memory reading (the counter holds tensors)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    return {
        **spec,
        "seconds": statistics.median(times),
        "all_seconds": [round(s, 3) for s in times],
        "peak_rss_gb": round(peak / 2**20, 2),
        "rss_before_steps_gb": round(rss_before / 2**20, 2),
        "flops": flops,
    }


def run_child(spec: dict, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--threads", str(threads), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return {**spec, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256, help="image size (latents /8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="half-width model, smoke run")
    parser.add_argument("--no-official", action="store_true", help="skip the official baseline")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    native_bf16 = peaks["bfloat16"] >= peaks["float32"]
    base = dict(
        views=args.views, resolution=args.resolution, repeats=args.repeats, quick=args.quick
    )
    plan = []
    if not args.no_official:
        plan.append(dict(base, impl="official", dtype="fp32", mode="forward"))
    plan.append(dict(base, impl="mvdiff", dtype="fp32", mode="forward"))
    plan.append(dict(base, impl="mvdiff", dtype="fp32", mode="train"))
    plan.append(dict(base, impl="mvdiff", dtype="fp32", mode="train", checkpointing=True))
    if not args.no_official:  # last: materialised attention needs ~17 GB at full size
        plan.append(dict(base, impl="official", dtype="fp32", mode="train"))
    if native_bf16:
        for mode in ("forward", "train"):
            plan.append(dict(base, impl="mvdiff", dtype="bf16", mode=mode))
        plan.append(dict(base, impl="mvdiff", dtype="bf16", mode="train", checkpointing=True))

    rows = []
    for spec in plan:
        row = run_child(spec, args.threads)
        rows.append(row)
        print(f"# {json.dumps(row)}", file=sys.stderr, flush=True)

    # Useful work per mode: the FLOPs without checkpointing (its recomputation is overhead).
    flops = {r["mode"]: r["flops"] for r in rows if r.get("flops") and not r.get("checkpointing")}
    for r in rows:
        if "seconds" in r and r["mode"] in flops:
            r["gflop"] = round(flops[r["mode"]] / 1e9, 1)
            r["gflops_per_s"] = round(flops[r["mode"]] / r["seconds"] / 1e9, 2)
            peak = peaks["bfloat16" if r["dtype"] == "bf16" else "float32"]
            r["fraction_of_matmul_peak"] = round(flops[r["mode"]] / r["seconds"] / peak, 3)
        r.pop("flops", None)

    def seconds(**match):
        for r in rows:
            if all(r.get(k) == v for k, v in match.items()) and not r.get("checkpointing"):
                return r.get("seconds")
        return None

    summary = {}
    for mode in ("forward", "train"):
        off, ours = (
            seconds(impl="official", dtype="fp32", mode=mode),
            seconds(impl="mvdiff", dtype="fp32", mode=mode),
        )
        if off and ours:
            summary[f"speedup_vs_official_fp32_{mode}"] = round(off / ours, 2)
        if off and flops.get(mode):
            # The most any implementation of these FLOPs could gain here: all of them at the
            # measured fp32 matmul peak (convolutions and matmuls are the same in both).
            at_peak = flops[mode] / peaks["float32"]
            summary[f"speedup_bound_at_fp32_matmul_peak_{mode}"] = round(off / at_peak, 2)
    result = {
        "benchmark": "bench_unet",
        "model": "sd-v2.1-base-4view" + (" (half width, --quick)" if args.quick else ""),
        "views": args.views,
        "resolution": args.resolution,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": {k: round(v / 1e9, 2) for k, v in peaks.items()},
        "summary": summary,
        "rows": rows,
    }
    if not native_bf16:
        result["bf16"] = (
            "skipped at full size: this CPU has no native bf16 "
            f"({torch.backends.cpu.get_cpu_capability()}); bf16 matmul peak "
            f"{peaks['bfloat16'] / 1e9:.2f} GFLOP/s vs fp32 {peaks['float32'] / 1e9:.2f}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
