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

bf16: on CPUs without native bf16 (no AVX512-BF16 / AMX) PyTorch's bf16 convolutions are
~100x slower than fp32, and one full-size bf16 UNet call did not finish in 25 minutes here.
So bf16 is measured on reduced workloads — the full UNet on 1 row of 8x8 latents and the full
VAE decoder on one 8x8 latent, in both dtypes — and the bf16/fp32 ratios are applied to the
measured full-size fp32 times; the text encoder runs in bf16 at full size.

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


def reduced_workload_ratios(pipe: MVDreamPipeline) -> dict:
    """bf16/fp32 time of the full UNet on (1, 4, 8, 8) and the full VAE decoder on one 8x8
    latent; and the bf16 text encoder at full size."""
    x = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 77, 1024)
    ids = pipe.tokenizer(["a DSLR photo of a corgi"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids  # fmt: skip
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe.to(dtype)
        name = str(dtype).removeprefix("torch.")
        unet = lambda d=dtype: pipe.unet(x.to(d), 500, text.to(d), num_views=1)  # noqa: E731
        vae = lambda d=dtype: pipe.vae.decode(x.to(d))  # noqa: E731
        out[f"unet_1x8x8_{name}_s"] = best_of(unet)
        log(f"{name}: reduced UNet call {out[f'unet_1x8x8_{name}_s']:.2f} s")
        out[f"vae_decode_1x8x8_{name}_s"] = best_of(vae)
        log(f"{name}: reduced VAE decode {out[f'vae_decode_1x8x8_{name}_s']:.2f} s")
        out[f"text_encoder_{name}_s"] = best_of(lambda: pipe.text_encoder(ids), 1)
    pipe.to(torch.float32)
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure-steps", type=int, default=2, help="real fp32 steps to run")
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
        "over the full schedules. bf16: fp32 times x bf16/fp32 ratios measured on reduced "
        "workloads (full UNet on 1x4x8x8, full VAE decoder on 1x4x8x8); text encoder measured",
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
    fp32 = measure(pipe, args.measure_steps)
    totals(fp32)
    result["float32"] = fp32

    r = reduced_workload_ratios(pipe)
    unet_ratio = r["unet_1x8x8_bfloat16_s"] / r["unet_1x8x8_float32_s"]
    vae_ratio = r["vae_decode_1x8x8_bfloat16_s"] / r["vae_decode_1x8x8_float32_s"]
    bf16 = {
        "estimated": True,
        "reduced_workloads": r,
        "unet_ratio_bf16_over_fp32": round(unet_ratio, 2),
        "vae_ratio_bf16_over_fp32": round(vae_ratio, 2),
        "unet_call_median_s": round(fp32["unet_call_median_s"] * unet_ratio, 3),
        "vae_decode_s": round(fp32["vae_decode_s"] * vae_ratio, 3),
        "text_encoder_s": r["text_encoder_bfloat16_s"],
        "loop_overhead_per_step_s": fp32["loop_overhead_per_step_s"],
    }
    totals(bf16)
    result["bfloat16"] = bf16
    result["dpm20_speedup_vs_ddim50"] = round(fp32["ddim50_s"] / fp32["dpm20_s"], 2)
    result["outside_unet_target"] = 0.05
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
