"""Sampling cost of MVDreamPipeline on CPU: 4 views at 256x256 with the full-size SD-2.1
multi-view UNet (random weights), DDIM 50 vs DPM-Solver++ 20, fp32 vs bf16, and the share of
the time spent outside the UNet (target: < 5 %).

All components are full size with random weights: the UNet from the ``sd-v2.1-base-4view``
preset, the VAE with Stable Diffusion's AutoencoderKL config and the text encoder with the
OpenCLIP ViT-H text tower's config as converted (23 layers, width 1024).

A UNet call on 8 rows (CFG x 4 views) at 32x32 latents takes many seconds on a CPU, so a
full 50-step run would take many minutes per configuration. The script therefore runs the
real fp32 pipeline for ``--measure-steps`` steps, timing every UNet call, the text encoder and
the VAE decode with hooks; it times the schedulers' own arithmetic over their full schedules
(50 DDIM / 20 DPM-Solver++ steps) on tensors of the right shape; and it extrapolates::

    total(N steps) = text + vae_decode + N * (unet_call + loop_overhead) + scheduler(N)

bf16: on CPUs without native bf16 (no AVX512-BF16 / AMX, like this AVX2 machine) PyTorch's
bf16 3x3 convolutions are ~100x slower than fp32; one full-size bf16 UNet call had not
finished after 25 minutes here, and small reduced workloads are overhead-bound and understate
the gap. So bf16 is reported as a probe at the real UNet shapes: one 3x3 conv
(8 x 320 x 32 x 32), one attention projection (8 x 1024 x 320) and one joined-view attention
(2 x 5 heads x 4096 tokens x 64) in fp32 and bf16; with ``--bf16-full`` the script also runs
the full bf16 pipeline (hours on such a CPU; meant for machines with native bf16).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mvdiff.convert import build_tokenizer  # noqa: E402
from mvdiff.models import PRESETS, MultiViewUNet2DConditionModel, multiview_unet_config  # noqa: E402
from mvdiff.pipelines import MVDreamPipeline, make_scheduler  # noqa: E402
from mvdiff.testing import ddim_scheduler  # noqa: E402

VIEWS, RES = 4, 256


def build_pipeline() -> MVDreamPipeline:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = multiview_unet_config(**PRESETS["sd-v2.1-base-4view"])
    unet = MultiViewUNet2DConditionModel.from_config(config).eval()
    vae = AutoencoderKL(  # Stable Diffusion's VAE config
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=RES,
        scaling_factor=0.18215,
    ).eval()
    text_encoder = CLIPTextModel(  # OpenCLIP ViT-H text tower, penultimate layer (as converted)
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1024,
        )
    ).eval()
    pipe = MVDreamPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer("openclip"),
        scheduler=ddim_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def log(msg: str) -> None:
    print(f"[bench_sample] {msg}", file=sys.stderr, flush=True)


class Timer:
    """Wall time of every forward of a module, via forward pre/post hooks."""

    def __init__(self, module: torch.nn.Module, name: str):
        self.name = name
        self.times: list[float] = []
        self._t0 = 0.0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, *_):
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.times.append(time.perf_counter() - self._t0)
        log(f"{self.name} call {len(self.times)}: {self.times[-1]:.2f} s")


def scheduler_seconds(name: str, steps: int, config) -> float:
    """The scheduler's own cost over its full schedule (set_timesteps + every step)."""
    sched = make_scheduler(name, config)
    latents = torch.randn(VIEWS, 4, RES // 8, RES // 8)
    eps = torch.randn_like(latents)
    t0 = time.perf_counter()
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        latents = sched.step(eps, t, latents).prev_sample
    return time.perf_counter() - t0


def measure(pipe: MVDreamPipeline, steps: int) -> dict:
    """One real pipeline run of ``steps`` DDIM steps, split into its parts."""
    unet_t = Timer(pipe.unet, "unet")
    text_t = Timer(pipe.text_encoder, "text_encoder")
    vae_t = Timer(pipe.vae.decoder, "vae decoder")
    t0 = time.perf_counter()
    pipe(
        "a DSLR photo of a corgi",
        num_views=VIEWS,
        height=RES,
        width=RES,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    wall = time.perf_counter() - t0
    for module in (pipe.unet, pipe.text_encoder, pipe.vae.decoder):  # drop the timers' hooks
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    unet_total = sum(unet_t.times)
    return {
        "measured_steps": steps,
        "wall_s": round(wall, 3),
        "unet_call_s": [round(x, 3) for x in unet_t.times],
        "unet_call_median_s": round(statistics.median(unet_t.times), 3),
        "text_encoder_s": round(sum(text_t.times), 3),
        "vae_decode_s": round(sum(vae_t.times), 3),
        "loop_overhead_per_step_s": round(
            (wall - unet_total - sum(text_t.times) - sum(vae_t.times)) / steps, 4
        ),
    }


def best_of(fn, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bf16_probe() -> dict:
    """fp32 and bf16 time of the UNet's main op kinds at its real shapes (first level)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(320, 320, 3, padding=1)
    linear = torch.nn.Linear(320, 320)
    x_conv, x_lin = torch.randn(8, 320, 32, 32), torch.randn(8, 1024, 320)
    q = torch.randn(2, 5, 4 * 1024, 64)  # (B, heads, V*L, head_dim): joined-view attention
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        c, lin, xc, xl, qq = (
            conv.to(dtype),
            linear.to(dtype),
            x_conv.to(dtype),
            x_lin.to(dtype),
            q.to(dtype),
        )
        out[f"conv3x3_{name}_s"] = best_of(lambda c=c, xc=xc: c(xc), 1)
        out[f"linear_{name}_s"] = best_of(lambda lin=lin, xl=xl: lin(xl))
        out[f"sdpa_{name}_s"] = best_of(lambda qq=qq: F.scaled_dot_product_attention(qq, qq, qq))
        log(f"probe {name}: {out}")
    ratios = {
        f"{k}_bf16_over_fp32": round(out[f"{k}_bfloat16_s"] / out[f"{k}_float32_s"], 2)
        for k in ("conv3x3", "linear", "sdpa")
    }
    return {**{k: round(v, 3) for k, v in out.items()}, **ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure-steps", type=int, default=3, help="real steps to run per dtype")
    ap.add_argument("--bf16-full", action="store_true", help="also run the full bf16 pipeline")
    args = ap.parse_args()

    t_build = time.perf_counter()
    pipe = build_pipeline()
    build_s = time.perf_counter() - t_build
    log(f"built the full-size components in {build_s:.0f} s")
    config = pipe.scheduler.config
    sched_cost = {
        "ddim50": scheduler_seconds("ddim", 50, config),
        "dpm20": scheduler_seconds("dpm", 20, config),
    }
    result = {
        "bench": "sample",
        "views": VIEWS,
        "resolution": RES,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_start": os.getloadavg()[0],
        "unet": "sd-v2.1-base-4view, random weights, "
        f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f}M params",
        "vae": "SD AutoencoderKL config, random weights (decoder timed)",
        "text_encoder": "OpenCLIP ViT-H text tower config (23 layers, width 1024), random",
        "method": "fp32: real pipeline run of measure_steps steps with per-module timers; totals "
        "for 50 DDIM / 20 DPM-Solver++ steps extrapolated per step; scheduler arithmetic timed "
        "over the full schedules. bf16: op-level probe at the UNet's real shapes (full run "
        "only with --bf16-full)",
        "build_s": round(build_s, 1),
        "scheduler_full_schedule_s": {k: round(v, 4) for k, v in sched_cost.items()},
    }

    def totals(m: dict) -> None:
        fixed = m["text_encoder_s"] + m["vae_decode_s"]
        per_step = m["unet_call_median_s"] + m["loop_overhead_per_step_s"]
        for key, n in (("ddim50", 50), ("dpm20", 20)):
            total = fixed + n * per_step + sched_cost[key]
            m[f"{key}_s"] = round(total, 1)
            m[f"{key}_outside_unet_share"] = round(1 - n * m["unet_call_median_s"] / total, 4)

    log(f"float32: running {args.measure_steps} real steps")
    result["vae_share_note"] = (
        "outside-UNet time is the text encoder + VAE decoder; "
        "the loop's own overhead is loop_overhead_per_step_s"
    )
    fp32 = measure(pipe, args.measure_steps)
    totals(fp32)
    result["float32"] = fp32

    result["bfloat16_probe"] = bf16_probe()
    if args.bf16_full:
        pipe.to(torch.bfloat16)
        log(f"bfloat16: running {args.measure_steps} real steps")
        bf16 = measure(pipe, args.measure_steps)
        totals(bf16)
        result["bfloat16"] = bf16
    else:
        result["bfloat16"] = "full run skipped (see bfloat16_probe; --bf16-full to run it)"
    result["dpm20_speedup_vs_ddim50"] = round(fp32["ddim50_s"] / fp32["dpm20_s"], 2)
    result["outside_unet_target"] = 0.05
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
