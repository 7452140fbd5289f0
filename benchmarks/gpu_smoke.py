#!/usr/bin/env python
"""The first run on a GPU machine: does every GPU path work, how fast, how much memory.

0. device checks (tiny models): the text-to-3D checkpoint loads with ``map_location`` on
   the GPU, the render generator lives there, attention slicing / xformers keep the views
   joined;

then, with random weights of the real sizes (SD-2.1-base multi-view UNet, SD VAE, an
OpenCLIP-H sized text encoder; nothing is downloaded) and synthetic shards:

1. training, the SD-2.1 recipe (``train/configs/mvdream_sd21.yaml``: 256², 4 views,
   batch 8 objects, gradient checkpointing, fused AdamW) with EMA, in bf16 and in fp16
   (GradScaler): ``--train-steps`` steps (20) as half, checkpoint, ``--resume latest``,
   the other half (the resumed half fails if the EMA weights stayed on the CPU); then the
   model folder is exported;
2. a 4-view sample from the exported folder (``MVDreamPipeline``);
3. text-to-3D: ``--sds-steps`` (50) SDS steps at 64² then ``--sds-hires-steps`` (10) at 256²
   with random shading (lambertian / textureless / albedo), fp32 and ``sds.autocast``;
4. engines: the same recipe under ``accelerate launch --config_file train/accelerate/X.yaml``
   for DDP (``ddp_8gpu.yaml``), FSDP2 (``fsdp.yaml``) and DeepSpeed ZeRO-2
   (``deepspeed_zero2.yaml``) on ``--engine-processes`` GPUs (1 is enough for FSDP and
   DeepSpeed to wrap the UNet, write and resume their sharded checkpoints and gather the
   export; DDP on one process is the reference run): half the steps,
   ``--resume latest``, the other half; then the export reloads as a pipeline, and its UNet
   is compared with the DDP run's (``max_abs_diff_vs_ddp``; same seed and data, but bf16 and
   each engine's own mixed-precision handling: close, not equal). An engine that cannot run
   here (FSDP / DeepSpeed without CUDA, DeepSpeed not installed) prints ``"skipped"``; on the
   CPU (``--tiny --phases engines``), DDP runs on 2 gloo processes.

Prints one JSON line per phase: seconds, steps/s, samples/s (training), peak GPU memory
(``torch.cuda.max_memory_allocated``, GiB; engines: the main process's, from its summary). Exit status: 0 all passed, 1 a phase failed
(its traceback is printed), 77 no CUDA device (prints "no GPU: skipped").

``--tiny`` runs the same code on tiny models and CPU-sized steps (the test suite does this;
figures are meaningless there).

    python benchmarks/gpu_smoke.py [--tiny] [--work-dir DIR]
        [--phases checks train sample sds engines] [--engines ddp fsdp deepspeed]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = 77
#: engine -> its accelerate config in train/accelerate (the engines phase)
ENGINES = {"ddp": "ddp_8gpu.yaml", "fsdp": "fsdp.yaml", "deepspeed": "deepspeed_zero2.yaml"}


def _gpu(device) -> bool:
    return device.type == "cuda"


def _reset_peak(device) -> None:
    import torch

    if _gpu(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    import torch

    if not _gpu(device):
        return None
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def full_size_folder(path: Path) -> Path:
    """A diffusers folder of SD-2.1-base sizes with random weights (plain SD layout: the
    trainer adds the camera MLP)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mvdiff.models import PRESETS, multiview_unet_config
    from mvdiff.testing import clip_tokenizer, ddim_scheduler
    from mvdiff.training.export import export_pipeline_folder

    torch.manual_seed(0)
    config = multiview_unet_config(sample_size=32, **{**PRESETS["sd-v2.1-base-4view"],
                                                      "camera_dim": None})  # fmt: skip
    unet = UNet2DConditionModel.from_config(config)
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
        scaling_factor=0.18215,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1024,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )  # fmt: skip
    )
    export_pipeline_folder(path, unet, vae, text, clip_tokenizer(), ddim_scheduler())
    return path


def recipe_overrides(args, work: Path, out: Path, half: int, precision: str) -> list[str]:
    """The SD-2.1 recipe's ``--set`` values for a run of 2 x ``half`` steps into ``out`` on the
    smoke shards: checkpoint at ``half``, EMA on, no validation (``--tiny``: 32², batch 1)."""
    res = 32 if args.tiny else 256
    overrides = [
        f"output_dir={out}", f"model.pretrained={args.model}",
        f"data.mv_shards={work}/shards/mv/*.tar", f"data.shards_2d={work}/shards/2d/*.tar",
        f"data.resolution={res}", f"data.min_size_2d={res}", "data.shuffle_buffer=8",
        f"mixed_precision={precision}", "ema=true", f"checkpoint.every={half}",
        "checkpoint.keep=1", "checkpoint.resume_data=skip", "validation.every=0", "log_every=1",
        "optim.warmup_steps=2",
    ]  # fmt: skip
    return overrides + (
        ["data.batch_size=1", "data.num_workers=0"] if args.tiny else ["data.num_workers=2"]
    )


def phase_train(args, work: Path, device, precision: str) -> dict:
    import torch
    from accelerate.state import AcceleratorState

    from mvdiff.config import load_config
    from mvdiff.training.config import TrainConfig
    from mvdiff.training.trainer import train

    out = work / f"train-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    half = max(args.train_steps // 2, 1)
    overrides = recipe_overrides(args, work, out, half, precision)
    recipe = ROOT / "train" / "configs" / "mvdream_sd21.yaml"
    _reset_peak(device)
    t0 = time.perf_counter()
    try:
        train(load_config(TrainConfig, recipe, [*overrides, f"max_steps={half}", "export=false"]))
        AcceleratorState._reset_state(reset_partial_state=True)
        summary = train(load_config(TrainConfig, recipe, [*overrides, f"max_steps={2 * half}",
                                                          "checkpoint.resume=latest"]))  # fmt: skip
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    seconds = time.perf_counter() - t0
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steady = logs[1:] or logs  # the first step includes compilation / cudnn autotuning
    samples_per_s = sum(r["samples_per_s"] for r in steady) / len(steady)  # images/s
    images_per_step = (1 if args.tiny else 8) * 4  # objects x views (2D batches: the same)
    if not (summary["steps"] == 2 * half and torch.isfinite(torch.tensor(summary["final_loss"]))):
        raise RuntimeError(f"training did not finish cleanly: {summary}")
    return {
        "phase": f"train-{precision}", "steps": 2 * half, "seconds": round(seconds, 1),
        "steps_per_s": round(samples_per_s / images_per_step, 3),
        "samples_per_s": round(samples_per_s, 2),
        "overflow_skips": summary.get("overflow_skips"), "final_loss": summary["final_loss"],
        "peak_gib": _peak_gib(device), "model": str(out / "model"),
    }  # fmt: skip


def phase_sample(args, work: Path, device, model: str) -> dict:
    import numpy as np
    import torch

    from mvdiff.pipelines import MVDreamPipeline

    pipe = MVDreamPipeline.from_pretrained(model).to(device)
    res = 32 if args.tiny else 256
    steps = 2 if args.tiny else 30
    _reset_peak(device)
    t0 = time.perf_counter()
    out = pipe("a red chair", num_views=4, height=res, width=res, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    seconds = time.perf_counter() - t0
    images = np.asarray(out.images)
    if images.shape[0] != 4 or not np.isfinite(images).all():
        raise RuntimeError(f"bad sample: shape {images.shape}")
    return {"phase": "sample-4view", "steps": steps, "seconds": round(seconds, 2),
            "steps_per_s": round(steps / seconds, 2), "peak_gib": _peak_gib(device)}  # fmt: skip


def phase_sds(args, work: Path, device, model: str, autocast: str) -> dict:
    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.sds.config import TextTo3DConfig
    from mvdiff.sds.field import FieldConfig
    from mvdiff.sds.guidance import SDSConfig
    from mvdiff.sds.text_to_3d import text_to_3d

    pipe = MVDreamPipeline.from_pretrained(model).to(device)
    lo, hi = (16, 32) if args.tiny else (64, 256)
    n_lo, n_hi = args.sds_steps, args.sds_hires_steps
    cfg = TextTo3DConfig(
        prompt="a red chair", steps=n_lo + n_hi, render_size=lo, render_size_late=hi,
        hires_after=n_lo, samples=16 if args.tiny else 64, shading="random",
        shading_probs=[0.34, 0.33, 0.33], save_every=0, mesh_resolution=32 if args.tiny else 64,
        turntable_frames=4, field=FieldConfig(resolutions=[8, 16] if args.tiny else [16, 32, 64, 128]),
        sds=SDSConfig(autocast=autocast, anneal_steps=n_lo + n_hi),
        # tiny: the random field's noisy ~18k-face mesh is decimated before its UV atlas and
        # baked into a small texture (the same export path; xatlas took ~3 s CPU per run)
        **(dict(mesh_faces=2000, texture_size=256) if args.tiny else {}),
    )  # fmt: skip
    out = work / f"sds-{autocast}"
    shutil.rmtree(out, ignore_errors=True)
    _reset_peak(device)
    t0 = time.perf_counter()
    summary = text_to_3d(pipe, cfg, out, progress=False, log=lambda *_: None)
    seconds = time.perf_counter() - t0
    return {"phase": f"sds-{autocast}", "steps": cfg.steps, "sizes": [lo, hi],
            "seconds": round(seconds, 1), "steps_per_s": round(cfg.steps / seconds, 2),
            "loss": summary["loss"], "peak_gib": _peak_gib(device)}  # fmt: skip


def engine_unavailable(engine: str, device) -> str | None:
    """Why ``engine`` cannot run here; None when it can."""
    import importlib.util

    if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed)"
    if engine != "ddp" and not _gpu(device):
        return "accelerate runs FSDP and DeepSpeed on CUDA only"
    return None


def _launch(args, device, engine: str, overrides: list[str]) -> None:
    """``accelerate launch`` of train/train.py with the recipe under ``engine``'s config."""
    import os
    import subprocess

    if _gpu(device):
        launcher = ["--config_file", str(ROOT / "train" / "accelerate" / ENGINES[engine]),
                    "--num_processes", str(args.engine_processes)]  # fmt: skip
        env = dict(os.environ)
    else:  # DDP on 2 gloo processes (accelerate's CPU path); bf16 autocast is slow there
        launcher = ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_machines", "1",
           "--dynamo_backend", "no", str(ROOT / "train" / "train.py"), "--config",
           str(ROOT / "train" / "configs" / "mvdream_sd21.yaml"), "--quiet"]  # fmt: skip
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine}: exit {proc.returncode}\n{proc.stderr[-4000:]}")


def phase_engine(args, work: Path, device, engine: str) -> dict:
    """The recipe under ``engine`` (see the module docstring, 4.)."""
    import torch

    from mvdiff.pipelines import MVDreamPipeline

    reason = engine_unavailable(engine, device)
    if reason is not None:
        return {"phase": f"engine-{engine}", "skipped": reason}
    out = work / f"engine-{engine}"
    shutil.rmtree(out, ignore_errors=True)
    half = max(args.train_steps // 2, 1)
    overrides = recipe_overrides(args, work, out, half, "auto")
    t0 = time.perf_counter()
    _launch(args, device, engine, [*overrides, f"max_steps={half}", "export=false"])
    _launch(args, device, engine, [*overrides, f"max_steps={2 * half}", "checkpoint.resume=latest"])
    seconds = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steady = logs[1:] or logs
    samples_per_s = sum(r["samples_per_s"] for r in steady) / len(steady)  # one process's
    if not (summary["steps"] == 2 * half and summary["final_loss"] is not None):
        raise RuntimeError(f"{engine}: training did not finish cleanly: {summary}")
    pipe = MVDreamPipeline.from_pretrained(str(out / "model"))  # the export reloads
    unet = {k: v.float() for k, v in pipe.unet.state_dict().items()}
    diff = None
    reference = work / "engine-ddp" / "model"
    if engine != "ddp" and (reference / "model_index.json").is_file():
        ref = MVDreamPipeline.from_pretrained(str(reference)).unet.state_dict()
        if sorted(ref) != sorted(unet):
            raise RuntimeError(f"{engine}: the exported UNet's keys differ from DDP's")
        diff = max((unet[k] - ref[k].float()).abs().max().item() for k in unet)
    if not all(torch.isfinite(v).all() for v in unet.values()):
        raise RuntimeError(f"{engine}: the exported UNet has non-finite weights")
    return {
        "phase": f"engine-{engine}", "steps": 2 * half, "seconds": round(seconds, 1),
        "steps_per_s": round(samples_per_s / ((1 if args.tiny else 8) * 4), 3),
        "samples_per_s": round(samples_per_s, 2), "peak_gib": summary.get("peak_gib"),
        "final_loss": summary["final_loss"], "max_abs_diff_vs_ddp": diff,
    }  # fmt: skip


def phase_checks(args, work: Path, device) -> dict:
    """Device-placement checks CPU tests cannot make: the text-to-3D checkpoint round trip
    with map_location on the device, the render generator on the device, and attention
    switches (slicing, xformers when installed) keeping the views joined on the device."""
    import torch

    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.sds.config import TextTo3DConfig
    from mvdiff.sds.loop import FitState
    from mvdiff.testing import tiny_components

    cfg = TextTo3DConfig.fast()
    fit = FitState(cfg, device)
    assert fit.render_generator.device.type == device.type, fit.render_generator.device
    torch.save(fit.state_dict(), work / "fit.pt")
    FitState(cfg, device).load_state_dict(torch.load(work / "fit.pt", map_location=device,
                                                     weights_only=True))  # fmt: skip
    pipe = MVDreamPipeline(**tiny_components()).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g).to(device)
    ctx = torch.randn(4, 7, 32, generator=g).to(device)
    t = torch.full((4,), 500, device=device)

    def joined() -> bool:
        x2 = x.clone()
        x2[3] += 1.0
        with torch.no_grad():
            a = pipe.unet(x, t, ctx, num_views=4).sample
            b = pipe.unet(x2, t, ctx, num_views=4).sample
        return bool((a[0] - b[0]).abs().max() > 1e-4)

    switches = {"default": joined()}
    pipe.enable_attention_slicing()
    switches["slicing"] = joined()
    pipe.disable_attention_slicing()
    try:
        pipe.enable_xformers_memory_efficient_attention()
        switches["xformers"] = joined()
    except (ImportError, ModuleNotFoundError, ValueError) as e:
        switches["xformers"] = f"not available: {e}"[:120]
    if not all(v is True or isinstance(v, str) for v in switches.values()):
        raise RuntimeError(f"views not joined after a switch: {switches}")
    return {"phase": "checks", "steps": 1, "steps_per_s": 1.0, "views_joined": switches}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on any device (tests)")
    ap.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir)")
    phases = ["checks", "train", "sample", "sds", "engines"]
    ap.add_argument("--phases", nargs="+", default=None, choices=phases,
                    help="default: all (--tiny on the CPU: all but engines)")  # fmt: skip
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ap.add_argument("--engine-processes", type=int, default=1,
                    help="GPUs per engine run (default 1)")  # fmt: skip
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp16"])
    ap.add_argument("--train-steps", type=int, default=None, help="default 20 (tiny: 2)")
    ap.add_argument("--sds-steps", type=int, default=None, help="at 64²; default 50 (tiny: 2)")
    ap.add_argument("--sds-hires-steps", type=int, default=None, help="256²; 10 (tiny: 1)")
    args = ap.parse_args(argv)
    import torch

    if args.tiny:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif not torch.cuda.is_available():
        print("no GPU: skipped (torch.cuda.is_available() is False; --tiny runs on the CPU)")
        return SKIPPED
    else:
        device = torch.device("cuda")
    if args.phases is None:  # the CPU's DDP launch is tests/test_train.py's (minutes here)
        args.phases = phases if _gpu(device) else phases[:-1]
    args.train_steps = args.train_steps or (2 if args.tiny else 20)
    args.sds_steps = args.sds_steps or (2 if args.tiny else 50)
    args.sds_hires_steps = args.sds_hires_steps or (1 if args.tiny else 10)
    if args.tiny and device.type == "cpu":
        args.precisions = [p for p in args.precisions if p != "fp16"] or ["no"]

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mvdiff-gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    from mvdiff.data.synthetic import write_synthetic_2d_shards, write_synthetic_mv_shards

    res = 32 if args.tiny else 256
    if not (work / "shards").is_dir():
        write_synthetic_mv_shards(work / "shards" / "mv", num_shards=2, objects_per_shard=8,
                                  num_views=8, resolution=res)  # fmt: skip
        write_synthetic_2d_shards(work / "shards" / "2d", num_shards=1, images_per_shard=32,
                                  size=(res + 8, res))  # fmt: skip
    if args.tiny:
        args.model = "tiny"
    else:
        args.model = str(work / "sd21-random")
        if not (Path(args.model) / "model_index.json").is_file():
            full_size_folder(Path(args.model))
    print(json.dumps({"device": torch.cuda.get_device_name(device) if _gpu(device) else "cpu",
                      "torch": torch.__version__, "work_dir": str(work)}), flush=True)  # fmt: skip

    failures, model = 0, None

    def run(fn, *a):
        nonlocal failures
        try:
            result = fn(*a)
        except Exception:  # noqa: BLE001 - report every phase, then a non-zero exit
            failures += 1
            traceback.print_exc()
            print(json.dumps({"phase": fn.__name__, "a": [str(x) for x in a[2:]], "ok": False}))
            return None
        print(json.dumps({**result, "ok": None if "skipped" in result else True}), flush=True)
        return result

    if "checks" in args.phases:
        run(phase_checks, args, work, device)
    if "train" in args.phases:
        for precision in args.precisions:
            result = run(phase_train, args, work, device, precision)
            if result is not None:
                model = result["model"]
    if model is None:  # no training this time: a previous run's export or the random folder
        found = sorted(work.glob("train-*/model/model_index.json"))
        model = str(found[0].parent) if found else None
    if model is None and ("sample" in args.phases or "sds" in args.phases):
        print("sample/sds need a trained model folder: run the train phase first")
        return 1
    if "sample" in args.phases:
        run(phase_sample, args, work, device, model)
    if "sds" in args.phases:
        for autocast in ["no", "fp16" if _gpu(device) else "bf16"]:
            run(phase_sds, args, work, device, model, autocast)
    if "engines" in args.phases:
        for engine in sorted(args.engines, key=list(ENGINES).index):  # DDP first: the reference
            run(phase_engine, args, work, device, engine)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
