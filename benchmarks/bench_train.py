#!/usr/bin/env python
"""Training throughput and peak memory on CPU: tiny and full-size (SD-2.1-base-sized
multi-view UNet, random weights) configs, fp32 vs bf16 autocast. Prints one JSON line.

Each case runs in its own process (so peak RSS is per case): AdamW training steps of the
multi-view UNet on 1 object x 4 views (the MVDream recipe's unit) through accelerate's
autocast. The tiny case includes the frozen VAE + text encoder; the full-size case feeds
random latents [4, 4, 32, 32] and text embeddings [1, 77, 1024] (the frozen encoders are
not what is being trained) and uses gradient checkpointing like the recipe.

Optimizer: AdamW for tiny; for full size the default is plain SGD (``--full-optimizer``),
because AdamW's fp32 states add 8 bytes/parameter (+6.9 GB for 865M parameters), which does
not fit next to other work on a shared 24 GiB machine; ``adamw_state_gib`` in the output says
how much more AdamW would need.

    python benchmarks/bench_train.py [--cases tiny-fp32 tiny-bf16 full-fp32 full-bf16]
    python benchmarks/bench_train.py --optimizers   # AdamW step: default vs foreach vs fused
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = ["tiny-fp32", "tiny-bf16", "full-fp32", "full-bf16"]


def run_case(case: str, steps: int, warmup: int, optimizer_name: str = "adamw") -> dict:
    import torch
    from accelerate import Accelerator

    from mvdiff.training.components import noise_scheduler_from
    from mvdiff.training.config import OptimConfig
    from mvdiff.training.loss import diffusion_loss, encode_images, encode_prompts
    from mvdiff.training.trainer import build_optimizer

    size, precision = case.split("-")
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=True)
    g = torch.Generator().manual_seed(0)
    views = 4
    if size == "tiny":
        from mvdiff.testing import tiny_components

        parts = tiny_components()
        unet, vae, te, tok = parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"]
        sched = noise_scheduler_from(parts["scheduler"])
        res = 32
        pixels = torch.randint(0, 256, (2, views, 3, res, res), dtype=torch.uint8)
        objects = 2
    else:
        from diffusers import DDPMScheduler

        from mvdiff.models import PRESETS, MultiViewUNet2DConditionModel, multiview_unet_config

        torch.manual_seed(0)
        config = multiview_unet_config(sample_size=32, **PRESETS["sd-v2.1-base-4view"])
        unet = MultiViewUNet2DConditionModel.from_config(config)
        unet.enable_gradient_checkpointing()
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        objects, res = 1, 256
    unet.train()
    params = sum(p.numel() for p in unet.parameters())
    if optimizer_name == "adamw":  # what `mvdiff train` builds (fused AdamW)
        optimizer = build_optimizer(list(unet.parameters()), OptimConfig(), lr=1e-5)
    else:
        optimizer = torch.optim.SGD(unet.parameters(), lr=1e-5)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        if size == "tiny":
            latents = encode_images(vae, pixels, g)
            text = encode_prompts(tok, te, ["a red ball, 3d asset"] * objects)
        else:
            latents = torch.randn(objects * views, 4, res // 8, res // 8, generator=g)
            text = torch.randn(objects, 77, 1024, generator=g)
        camera = torch.randn(objects * views, 16, generator=g)
        with accelerator.autocast():
            loss = diffusion_loss(unet, sched, latents, text, camera, views, g)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        print(f"{case}: step {i + 1}/{warmup + steps} {time.perf_counter() - t0:.2f}s",
              file=sys.stderr, flush=True)  # fmt: skip
    step_s = statistics.median(times)
    return {
        "case": case,
        "params_m": round(params / 1e6, 1),
        "resolution": res,
        "objects_per_step": objects,
        "images_per_step": objects * views,
        "step_s_median": round(step_s, 3),
        "samples_per_s": round(objects * views / step_s, 3),
        "objects_per_s": round(objects / step_s, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "loss_finite": bool(torch.isfinite(loss).item()),
        "timed_steps": steps,
        "optimizer": optimizer_name,
        "adamw_state_gib": round(params * 8 / 2**30, 2),
    }


def compare_optimizers(repeats: int = 30) -> dict:
    """Median milliseconds of one AdamW step over the tiny UNet's parameters (random
    gradients): torch's default (a per-parameter loop on CPU), ``foreach`` and ``fused`` (what
    ``mvdiff train`` uses), interleaved so that the machine's noise hits all three alike."""
    import torch

    from mvdiff.testing import tiny_unet

    unet = tiny_unet(0)
    params = list(unet.parameters())
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    kinds = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optims = {k: torch.optim.AdamW(params, lr=1e-5, **kw) for k, kw in kinds.items()}
    times = {k: [] for k in kinds}
    for _ in range(repeats):
        for k, opt in optims.items():
            t0 = time.perf_counter()
            opt.step()
            times[k].append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {"params_m": round(sum(p.numel() for p in params) / 1e6, 2),
            "step_ms_median": {k: round(v, 2) for k, v in ms.items()},
            "fused_speedup": round(ms["default"] / ms["fused"], 2)}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (tiny cases)")
    parser.add_argument("--full-steps", type=int, default=1, help="timed steps (full cases)")
    parser.add_argument("--full-warmup", type=int, default=0, help="untimed steps (full cases)")
    parser.add_argument("--full-optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--optimizers", action="store_true",
                        help="only time AdamW steps: torch default vs foreach vs fused")  # fmt: skip
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case here
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    args = parser.parse_args(argv)
    if args.optimizers:
        print(json.dumps({"bench": "train-optimizer", "device": "cpu", **compare_optimizers()}))
        return 0
    if args.case:
        if args.case.startswith("full"):
            result = run_case(args.case, args.full_steps, args.full_warmup, args.full_optimizer)
        else:
            result = run_case(args.case, args.steps, warmup=1)
        print(json.dumps(result))
        return 0
    import torch

    results = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--case", case, "--steps", str(args.steps),
               "--full-steps", str(args.full_steps), "--full-warmup", str(args.full_warmup),
               "--full-optimizer", args.full_optimizer]  # fmt: skip
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        except subprocess.TimeoutExpired:
            results.append({"case": case, "error": f"timeout after {args.timeout}s"})
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            tail = proc.stderr.strip().splitlines()[-1:]
            reason = f"exit status {proc.returncode}" + (
                " (killed by a signal: out of memory?)" if proc.returncode < 0 else ""
            )
            results.append({"case": case, "error": reason, "stderr_tail": tail})
        else:
            results.append({**json.loads(lines[-1]), "wall_s": round(time.time() - t0, 1)})
    print(json.dumps({"bench": "train", "device": "cpu", "threads": torch.get_num_threads(),
                      "results": results}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
