"""``mvdiff sample``: a prompt (or a photo) -> V consistent views (PNGs, a grid, a GIF).

Writes into ``--output``::

    view_00.png ... view_{V-1}.png   one image per view (azimuth order)
    grid.png                         the views side by side
    turntable.gif                    the views as a looping animation
    cameras.json                     elevation, azimuth, c2w and model vector of every view
    settings.json                    everything needed to reproduce the run, plus versions
    input.png                        with --image: the RGB image the model was conditioned on

``--image photo.png`` (an ImageDream model, e.g. a converted ``sd-v2.1-base-4view-ipmv.pt``)
conditions on a photo: RGBA is composited over ``--background`` (a grey level; default drawn
from the seed, as the official demo's random grey), RGB is used as is (put the object on a
plain background first). Unless given, elevation, guidance and negative prompt take the
official ImageDream demo's values (5 degrees, 5.0, its negative prompt); the prompt may be
empty.

``mvdiff sample --settings OLD/settings.json --output NEW`` repeats a run exactly (flags given
next to ``--settings`` override it). Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Literal

from mvdiff.errors import UserError
from mvdiff.io import save_image, write_json
from mvdiff.shards import CAPTION_SUFFIX

SETTINGS_FORMAT = "mvdiff-sample/1"


@dataclasses.dataclass
class SampleSettings:
    """What determines the images (saved as ``settings`` in settings.json)."""

    model: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    prompt_suffix: str = CAPTION_SUFFIX
    num_views: int = 4
    elevation: float = 15.0
    azimuth_start: float = 0.0
    azimuth_span: float = 360.0
    height: int = 256
    width: int = 256
    steps: int = 50
    guidance: float = 7.5
    guidance_rescale: float = 0.0
    eta: float = 0.0
    seed: int = 0
    scheduler: Literal["ddim", "dpm", "euler", "unipc"] = "ddim"  # mvdiff.pipelines.SCHEDULERS
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    original_config: str | None = None
    lora: str | None = None
    image: str | None = None
    background: float | None = None
    reference_frame: bool = True

    def validate(self) -> None:
        """What the field types cannot say (see :func:`mvdiff.config.validate_config`)."""
        s = self
        if not s.model:
            raise UserError("--model is required (or --settings)")
        if not s.prompt.strip() and not s.image:
            raise UserError("--prompt is required and must not be empty (or give --image)")
        if s.image and not Path(s.image).is_file():
            raise UserError(f"--image {s.image}: no such file")
        if s.background is not None and not 0 <= s.background <= 1:
            raise UserError(f"--background must be in [0, 1], got {s.background}")
        if s.num_views < 1:
            raise UserError(f"--num-views must be >= 1, got {s.num_views}")
        if s.num_views > 1 and not 0 < s.azimuth_span <= 360:
            raise UserError(f"--azimuth-span must be in (0, 360], got {s.azimuth_span}")
        if s.num_views > 1 and s.azimuth_span / s.num_views < 1.0:
            raise UserError(
                f"--num-views {s.num_views} over --azimuth-span {s.azimuth_span} puts views "
                "less than 1 degree apart"
            )
        for flag, value in (("--height", s.height), ("--width", s.width)):
            if value <= 0 or value % 8:
                raise UserError(f"{flag} must be a positive multiple of 8, got {value}")
        if s.steps < 1:
            raise UserError(f"--steps must be >= 1, got {s.steps}")
        if not 0 <= s.guidance_rescale <= 1:
            raise UserError(f"--guidance-rescale must be in [0, 1], got {s.guidance_rescale}")


#: The official ImageDream demo's settings (scripts/demo.py), used with --image unless given.
IMAGE_DEFAULTS = {
    "elevation": 5.0,
    "guidance": 5.0,
    "negative_prompt": "uniform low no texture ugly, boring, bad anatomy, blurry, pixelated,  "
    "obscure, unnatural colors, poor lighting, dull, and unclear.",
}


# flag -> (field, type, help); defaults come from SampleSettings
_FLAGS = {
    "--model": ("model", str, "diffusers folder, official checkpoint (.pt, converted and "
                "cached), hub id, or a LoRA adapter folder from `mvdiff dreambooth --lora`"),
    "--prompt": ("prompt", str, "text prompt"),
    "--negative-prompt": ("negative_prompt", str, "negative prompt (default: empty)"),
    "--prompt-suffix": ("prompt_suffix", str, f"appended to the prompt (default "
                        f"{CAPTION_SUFFIX!r}; '' to disable)"),
    "--num-views": ("num_views", int, "views around the object (default 4; 1 = plain 2D)"),
    "--elevation": ("elevation", float, "camera elevation in degrees (default 15)"),
    "--azimuth-start": ("azimuth_start", float, "azimuth of the first view (default 0 = front)"),
    "--azimuth-span": ("azimuth_span", float, "degrees covered by the views (default 360)"),
    "--height": ("height", int, "image height, multiple of 8 (default 256)"),
    "--width": ("width", int, "image width, multiple of 8 (default 256)"),
    "--steps": ("steps", int, "denoising steps (default 50; ~20 with --scheduler dpm)"),
    "--guidance": ("guidance", float, "classifier-free guidance scale (default 7.5)"),
    "--guidance-rescale": ("guidance_rescale", float, "CFG rescale in [0, 1] (default 0)"),
    "--eta": ("eta", float, "DDIM eta (default 0)"),
    "--seed": ("seed", int, "random seed (default 0)"),
    "--scheduler": ("scheduler", str, "ddim (official) | dpm (DPM-Solver++) | euler | unipc"),
    "--dtype": ("dtype", str, "auto | float32 | float16 | bfloat16 (auto: fp16 on GPU, fp32 on CPU)"),
    "--device": ("device", str, "auto | cpu | cuda | cuda:N | mps"),
    "--original-config": ("original_config", str, "official-style YAML for a .pt checkpoint"),
    "--lora": ("lora", str, "LoRA adapter folder (mvdiff dreambooth --lora) applied on --model"),
    "--image": ("image", str, "photo to condition on (ImageDream models; RGBA or RGB on a "
                "plain background)"),
    "--background": ("background", float, "grey level in [0, 1] behind an RGBA --image "
                     "(default: drawn from the seed, as the official demo)"),
}  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    from mvdiff.config import add_config_arguments, add_quiet_argument

    p = sub.add_parser(
        "sample",
        help="sample multi-view images from a text prompt",
        description="Sample V consistent views of an object from a text prompt with "
        "MVDreamPipeline; writes per-view PNGs, a grid, a turntable GIF, cameras.json and "
        "settings.json (which --settings replays exactly).",
    )
    for flag, (_, tp, help_) in _FLAGS.items():
        p.add_argument(flag, type=tp, default=None, help=help_)
    p.add_argument(
        "--no-reference-frame",
        dest="no_reference_frame",
        action="store_true",
        help="with --image: image tokens only, no fifth reference view (ImageDream 'local' mode)",
    )
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--settings", default=None, help="settings.json of an earlier run to repeat")
    add_config_arguments(p, "SampleSettings (the fields of settings.json's settings)", "steps=20")
    add_quiet_argument(p)
    p.add_argument("--cache-dir", default=None, help="where converted checkpoints are cached")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier sample in --output")
    p.set_defaults(run=run)


def resolve_settings(args: argparse.Namespace) -> SampleSettings:
    """Defaults <- ``--settings`` (if any) <- ``--config`` <- ``--set`` <- the flags given;
    with ``--image``, the official ImageDream values for what none of those set; checked."""
    from mvdiff.config import (
        config_from_args,
        config_from_dict,
        read_config_file,
        validate_config,
    )

    base, explicit = SampleSettings(), set()
    if args.settings:
        path = Path(args.settings)
        try:
            saved = json.loads(path.read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--settings {path}: not a readable settings.json ({e})") from None
        base = config_from_dict(SampleSettings, saved, f"--settings {path}")
        explicit |= set(saved)
    flags = {flag: (field, getattr(args, field)) for flag, (field, _, _) in _FLAGS.items()}
    if getattr(args, "no_reference_frame", False):
        flags["--no-reference-frame"] = ("reference_frame", False)
    s = config_from_args(SampleSettings, args, flags, base=base, validate=False)
    explicit |= {field for field, value in flags.values() if value is not None}
    explicit |= {item.split("=", 1)[0].strip() for item in args.overrides}
    if args.config:
        explicit |= set(read_config_file(args.config, "--config"))
    if s.image:
        for field, value in IMAGE_DEFAULTS.items():
            if field not in explicit:
                setattr(s, field, value)
    return validate_config(s)


def resolve_device(s: SampleSettings) -> tuple[str, str]:
    """('cpu' | 'cuda[:N]' | 'mps', 'float32' | 'float16' | 'bfloat16') for 'auto' values."""
    import torch

    device = s.device
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device name") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available")
    dtype = s.dtype
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "float16"
    return device, dtype


def _versions() -> dict:
    import importlib.metadata
    import platform

    out = {"python": platform.python_version()}
    for dist in ("mvdiff", "torch", "diffusers", "transformers", "numpy", "pillow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def cameras_record(s: SampleSettings, camera) -> dict:
    """cameras.json: the convention and, per view, elevation, azimuth, c2w and model vector."""
    import numpy as np

    from mvdiff.cameras import orbit_c2w

    record = {
        "convention": "mvdiff / official MVDream: z-up world, OpenGL camera (looks down -z), "
        "camera-to-world matrices, azimuth 0 on -y, counter-clockwise seen from +z (docs/design.md §4)",
        "num_views": s.num_views,
        "views": [],
    }
    for v in range(s.num_views):
        azimuth = s.azimuth_start + v * s.azimuth_span / s.num_views
        view = {"index": v, "file": f"view_{v:02d}.png", "elevation_deg": s.elevation,
                "azimuth_deg": azimuth}  # fmt: skip
        if camera is not None:
            view["c2w"] = np.asarray(orbit_c2w(s.elevation, azimuth, 1.0)).tolist()
            view["camera_vector"] = [float(x) for x in camera[v]]
        else:
            view["c2w"] = view["camera_vector"] = None  # 2D mode: no camera conditioning
        record["views"].append(view)
    return record


def run(args: argparse.Namespace) -> int:
    import time

    from mvdiff.pipelines.loading import model_kind

    s = resolve_settings(args)
    model_kind(s.model)  # fail fast on a wrong path, before importing torch
    if s.lora:
        from mvdiff.pipelines.loading import read_adapter_meta

        read_adapter_meta(s.lora)
    out = Path(args.output)
    if (out / "settings.json").exists() and not args.overwrite:
        raise UserError(f"--output {out} already holds a sample; use --overwrite or a new folder")
    device, dtype_name = resolve_device(s)

    import numpy as np
    import PIL.Image
    import torch

    from mvdiff.pipelines import make_scheduler
    from mvdiff.pipelines.loading import load_pipeline

    print("settings:", json.dumps(dataclasses.asdict(s)), flush=True)
    t0 = time.perf_counter()
    pipe, model_info = load_pipeline(
        s.model, getattr(torch, dtype_name), s.original_config, args.cache_dir, lora=s.lora
    )
    if s.image and not pipe.has_image_prompt:
        raise UserError(f"--image: this model has no image prompt (not ImageDream): {s.model}")
    pipe.scheduler = make_scheduler(s.scheduler, pipe.scheduler.config)
    pipe.to(device)
    adapter = model_info.get("adapter", {}).get("folder")
    base = model_info.get("folder") or model_info.get("base_model") or s.model
    print(f"loaded {base}{f' + LoRA {adapter}' if adapter else ''} "
          f"on {device} ({dtype_name})", flush=True)  # fmt: skip

    photo = None
    if s.image:
        try:
            with PIL.Image.open(s.image) as im:
                im.load()
                photo = im.copy()
        except (OSError, ValueError) as e:
            raise UserError(f"--image {s.image}: not a readable image ({e})") from None
    t1 = time.perf_counter()
    result = pipe(
        s.prompt,
        negative_prompt=s.negative_prompt,
        prompt_suffix=s.prompt_suffix,
        num_views=s.num_views,
        elevation=s.elevation,
        azimuth_start=s.azimuth_start,
        azimuth_span=s.azimuth_span,
        height=s.height,
        width=s.width,
        num_inference_steps=s.steps,
        guidance_scale=s.guidance,
        guidance_rescale=s.guidance_rescale,
        eta=s.eta,
        generator=torch.Generator("cpu").manual_seed(s.seed),
        output_type="pil",
        image=photo,
        reference_frame=s.reference_frame,
        image_background=s.background,
    )
    sample_seconds = time.perf_counter() - t1
    images = result.images

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for v, image in enumerate(images):
        name = f"view_{v:02d}.png"
        save_image(out / name, image)
        files.append(name)
    grid = PIL.Image.fromarray(np.concatenate([np.asarray(im) for im in images], axis=1))
    save_image(out / "grid.png", grid)
    save_image(
        out / "turntable.gif",
        images[0],
        save_all=True,
        append_images=images[1:],
        duration=400,
        loop=0,
    )
    cameras = cameras_record(s, result.cameras)
    if photo is not None and s.reference_frame:
        cameras["reference_frame"] = {
            "file": "input.png",
            "camera_vector": [0.0] * 16,
            "note": "the input photo, a fifth view with the zero camera (official ImageDream)",
        }
    write_json(out / "cameras.json", cameras)
    files += ["grid.png", "turntable.gif", "cameras.json"]
    if photo is not None:
        save_image(out / "input.png", result.input_images[0])
        files.append("input.png")

    resolved = dataclasses.replace(s, device=device, dtype=dtype_name)
    settings = {
        "format": SETTINGS_FORMAT,
        "settings": dataclasses.asdict(resolved),
        "replay": f"mvdiff sample --settings {out / 'settings.json'} --output NEW_FOLDER",
        "model": model_info,
        "versions": _versions(),
        "torch_threads": torch.get_num_threads(),
        "seconds": {"load": round(t1 - t0, 3), "sample": round(sample_seconds, 3)},
        "files": files,
    }
    write_json(out / "settings.json", settings)
    print(f"wrote {len(images)} views, grid.png, turntable.gif to {out} "
          f"({sample_seconds:.1f} s sampling)")  # fmt: skip
    return 0
