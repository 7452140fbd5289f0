"""The quickstart: the whole mvdiff story on a laptop CPU in a few minutes.

``mvdiff quickstart --output DIR`` runs, top to bottom, with the real library code:

1. **render** the bundled real 3D assets (``tests/fixtures/assets``: glTF + OBJ files) with
   Blender Cycles (:func:`mvdiff.render.runner.render_objects`) into multi-view shards
   (docs/design.md §3) plus a manifest;
2. **photos**: write a small 2D image-text shard (img2dataset layout) from the bundled real
   photos in ``mvdiff/resources/photos`` with their captions;
3. **train** a tiny random multi-view model on CPU jointly on both (the trainer of
   ``mvdiff train`` / ``train/train.py``: :func:`mvdiff.training.trainer.train`), which
   exports a diffusers-format model folder;
4. **sample** 4 views for a prompt with :class:`mvdiff.pipelines.MVDreamPipeline` from that
   folder;
5. **text3d**: a short text-to-3D run (multi-view SDS, :func:`mvdiff.sds.text_to_3d.text_to_3d`
   with the CPU preset) with the trained model as the prior: views, turntable, mesh;
6. **report**: ``DIR/index.html`` with a contact sheet of the renders, the training loss
   curve, the sampled views, the text-to-3D turntable and a table of where every output is.

Layout of ``DIR``::

    quickstart_config.yaml   the resolved config (a re-run must match it)
    renders/                 mv-*.tar shards, manifest.jsonl, render_config.yaml
    photos/00000.tar         the 2D image-text shard
    train/                   config.yaml, log.jsonl, checkpoints/, model/ (diffusers folder)
    samples/                 view_00.png ... grid.png, turntable.gif
    text_to_3d/              views.png, turntable.gif, mesh.obj, mesh.ply, checkpoint.pt
    renders.png loss.png samples.png index.html summary.json

Re-running into the same folder **resumes**: with the same config, finished stages are
skipped (their ``.quickstart/STAGE.json`` marker exists), the renderer skips objects its
manifest lists as done and training continues from its latest checkpoint. A folder that
holds a quickstart run with a *different* config is refused (one-line error), as is a folder
that another quickstart is writing to. Every file is written under a temporary name and
renamed.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import html
import importlib.util
import io
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mvdiff.config import config_to_dict, dump_config, save_config
from mvdiff.errors import UserError
from mvdiff.io import atomic_write, save_image, write_text

PACKAGE_DIR = Path(__file__).resolve().parent
PHOTOS_DIR = PACKAGE_DIR / "resources" / "photos"
#: the bundled assets live in the source checkout (``pip install -e .``)
ASSETS_DIR = PACKAGE_DIR.parent / "tests" / "fixtures" / "assets"
#: captions of the bundled assets (others fall back to their file name)
ASSET_CAPTIONS = {
    "BoxTextured": "a cube with a blue and green logo on every side",
    "monkey": "a white monkey head",
    "capsule": "a capsule with a colourful texture",
    "rabbit": "a magenta rabbit",
}
TEXT_TO_3D_OFF = "text-to-3D: skipped (text3d.enabled=false)"
INSTALL_RENDER = 'pip install -e ".[render]"'
STAGES = ("render", "photos", "train", "sample", "text3d", "report")


# ---- config -------------------------------------------------------------------------------
@dataclass
class RenderStage:
    #: asset files or folders; empty = the bundled assets (tests/fixtures/assets)
    assets: list[str] = field(default_factory=list)
    views: int = 8
    resolution: int = 64
    samples: int = 16
    rig: str = "mvdream"  # mvdream | orbit | fixed (see mvdiff render --help)
    workers: int = 0  # 0 = one per CPU core
    timeout: float = 300.0


@dataclass
class PhotoStage:
    #: a folder of photos + captions.json ({file: caption}); empty = the bundled photos
    folder: str = ""


@dataclass
class TrainStage:
    max_steps: int = 150
    batch_size: int = 2
    #: training resolution (the tiny model's VAE works at any multiple of 8)
    resolution: int = 32
    num_views: int = 4
    p_2d: float = 0.3
    lr: float = 1e-3
    log_every: int = 5
    checkpoint_every: int = 50
    #: extra ``key=value`` overrides of the TrainConfig (e.g. ["optim.warmup_steps=10"])
    overrides: list[str] = field(default_factory=list)


@dataclass
class SampleStage:
    prompt: str = "a magenta rabbit"
    num_views: int = 4
    elevation: float = 15.0
    resolution: int = 32
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0


@dataclass
class Text3DStage:
    enabled: bool = True
    prompt: str = ""  # "" = sample.prompt
    #: SDS steps of the CPU preset (TextTo3DConfig.fast); the real recipe uses 10000
    steps: int = 100
    seed: int = 0


@dataclass
class QuickstartConfig:
    output: str = ""
    seed: int = 0
    #: torch intra-op threads for training and sampling (0 = torch's default). One thread is
    #: faster for the tiny model, and much faster on a busy shared CPU (no OpenMP spin-waits).
    threads: int = 1
    render: RenderStage = field(default_factory=RenderStage)
    photos: PhotoStage = field(default_factory=PhotoStage)
    train: TrainStage = field(default_factory=TrainStage)
    sample: SampleStage = field(default_factory=SampleStage)
    text3d: Text3DStage = field(default_factory=Text3DStage)

    def validate(self) -> QuickstartConfig:
        if not self.output:
            raise UserError("--output is required")
        if self.train.max_steps < 1:
            raise UserError(f"train.max_steps must be >= 1, got {self.train.max_steps}")
        if self.render.views < self.train.num_views:
            raise UserError(
                f"render.views ({self.render.views}) must be >= train.num_views "
                f"({self.train.num_views})"
            )
        for name, value in (("train.resolution", self.train.resolution),
                            ("sample.resolution", self.sample.resolution)):  # fmt: skip
            if value < 8 or value % 8:
                raise UserError(f"{name} must be a positive multiple of 8, got {value}")
        if self.text3d.enabled and self.text3d.steps < 1:
            raise UserError(f"text3d.steps must be >= 1, got {self.text3d.steps}")
        if not self.sample.prompt.strip():
            raise UserError("sample.prompt must not be empty")
        return self


# ---- small helpers ------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Run:
    """The output folder: lock, config check, stage markers."""

    def __init__(self, cfg: QuickstartConfig):
        self.cfg = cfg
        self.out = Path(cfg.output)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--output {self.out}: cannot create the folder ({e})") from None
        self.state = self.out / ".quickstart"
        saved = self.out / "quickstart_config.yaml"
        if not saved.exists() and any(p.name != ".quickstart" for p in self.out.iterdir()):
            raise UserError(
                f"--output {self.out} is not empty and holds no quickstart run; "
                "use a new or empty folder"
            )
        self.state.mkdir(exist_ok=True)
        self._lock = open(self.state / "lock", "w")  # noqa: SIM115 (held for the whole run)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise UserError(
                f"--output {self.out}: another mvdiff quickstart is writing there"
            ) from None
        self.resumed = False
        if saved.exists():
            import yaml

            previous = yaml.safe_load(saved.read_text()) or {}
            previous.pop("output", None)
            current = config_to_dict(cfg)
            current.pop("output")
            if previous != current:
                self.close()
                raise UserError(
                    f"--output {self.out} holds a quickstart run with different settings "
                    f"(see {saved}); use a new folder or the same settings to resume it"
                )
            self.resumed = any(self.state.glob("*.json"))
        save_config(cfg, saved)

    def done(self, stage: str) -> dict | None:
        marker = self.state / f"{stage}.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def mark(self, stage: str, record: dict) -> None:
        write_text(self.state / f"{stage}.json", json.dumps(record, indent=1) + "\n")

    def close(self) -> None:
        self._lock.close()


# ---- stage 1: render ----------------------------------------------------------------------
def check_render_available() -> None:
    """bpy importable? Otherwise a one-line error with the install command."""
    if importlib.util.find_spec("bpy") is None:
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        extra = "" if py == "3.11" else f" (bpy 5.0.1 needs Python 3.11; this is Python {py})"
        raise UserError(f"the quickstart renders with Blender's bpy, which is not installed: "
                        f"{INSTALL_RENDER}{extra}")  # fmt: skip


def asset_inputs(cfg: QuickstartConfig) -> list[str]:
    if cfg.render.assets:
        return list(cfg.render.assets)
    if not ASSETS_DIR.is_dir():
        raise UserError(
            f"the bundled 3D assets ({ASSETS_DIR}) are not there (they ship with the source "
            "checkout: pip install -e .); give your own with --set render.assets=[DIR]"
        )
    return [str(ASSETS_DIR)]


def stage_render(cfg: QuickstartConfig, out: Path) -> dict:
    from mvdiff.render.config import RenderConfig
    from mvdiff.render.runner import render_objects
    from mvdiff.render.shards import check_shard, contact_sheet

    folder = out / "renders"
    folder.mkdir(parents=True, exist_ok=True)
    captions = folder / "captions.csv"

    def write_captions(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["uid", "caption"])
            w.writerows(ASSET_CAPTIONS.items())

    atomic_write(captions, write_captions)
    r = cfg.render
    rcfg = RenderConfig(
        inputs=asset_inputs(cfg), output=str(folder), captions=str(captions), views=r.views,
        resolution=r.resolution, samples=r.samples, rig=r.rig, workers=r.workers,
        timeout=r.timeout, seed=cfg.seed, shard_prefix="mv",
    )  # fmt: skip
    summary = render_objects(rcfg.validate(), progress=True)
    shards = sorted(folder.glob("mv-*.tar"))
    reports = [check_shard(s) for s in shards]
    errors = [e for rep in reports for e in rep["errors"]]
    if errors:
        raise RuntimeError(f"rendered shards fail the schema check: {errors[:3]}")
    objects = sum(rep["samples"] for rep in reports)
    if objects == 0:
        raise UserError(f"no asset rendered (see {folder / 'manifest.jsonl'})")
    sheet = out / "renders.png"
    tmp = out / ".renders.tmp.png"  # contact_sheet picks the format from the suffix
    contact_sheet(shards, tmp, max_samples=16, max_views=r.views, tile=96)
    os.replace(tmp, sheet)
    return {"folder": str(folder), "shards": [str(s) for s in shards], "objects": objects,
            "views": sum(rep["views"] for rep in reports), "failed": summary["failed"],
            "contact_sheet": str(sheet)}  # fmt: skip


# ---- stage 2: the 2D shard ----------------------------------------------------------------
def stage_photos(cfg: QuickstartConfig, out: Path) -> dict:
    from PIL import Image

    from mvdiff.shards import write_members

    src = Path(cfg.photos.folder) if cfg.photos.folder else PHOTOS_DIR
    captions_file = src / "captions.json"
    if not captions_file.is_file():
        raise UserError(f"photos.folder {src}: no captions.json ({{file: caption}})")
    captions = json.loads(captions_file.read_text())
    shard = out / "photos" / "00000.tar"

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (name, caption) in enumerate(sorted(captions.items())):
                path = src / name
                if not path.is_file():
                    raise UserError(f"photos.folder {src}: {name} (in captions.json) is missing")
                data = path.read_bytes()
                with Image.open(io.BytesIO(data)) as im:
                    width, height = im.size
                    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(im.format)
                if ext is None:
                    raise UserError(f"photos.folder {src}: {name} is not a JPEG/PNG/WebP")
                key = f"{i:09d}"
                meta = {"key": key, "caption": caption, "width": width, "height": height,
                        "source": f"mvdiff/resources/photos/{name}" if src == PHOTOS_DIR
                        else str(path)}  # fmt: skip
                members = {ext: data, "txt": caption.encode(), "json": json.dumps(meta).encode()}
                write_members(tar, key, members)

    atomic_write(shard, write)
    return {"shard": str(shard), "images": len(captions)}


# ---- stage 3: train -----------------------------------------------------------------------
def train_config(cfg: QuickstartConfig, out: Path, shards: list[str], shard_2d: str):
    """The TrainConfig of the tiny joint run (what ``train/configs/tiny_cpu.yaml`` sets)."""
    from mvdiff.config import apply_overrides
    from mvdiff.training.config import TrainConfig

    t = cfg.train
    base = [
        f"output_dir={out / 'train'}", f"seed={cfg.seed}", f"max_steps={t.max_steps}",
        'mixed_precision="no"', "caption_dropout=0.1", f"log_every={t.log_every}",
        "model.pretrained=tiny",
        f"data.num_views={t.num_views}", f"data.resolution={t.resolution}",
        f"data.batch_size={t.batch_size}", f"data.p_2d={t.p_2d}",
        f"data.min_size_2d={t.resolution}", "data.shuffle_buffer=16", "data.num_workers=0",
        f"optim.lr={t.lr}", "optim.warmup_steps=5", "optim.weight_decay=0.0",
        "optim.max_grad_norm=1.0",
        f"checkpoint.every={t.checkpoint_every}", "checkpoint.keep=1", "checkpoint.resume=latest",
        "validation.every=0",
    ]  # fmt: skip
    tcfg = apply_overrides(TrainConfig(), base, where="quickstart")
    # shard lists contain characters YAML would parse: set them directly
    tcfg.data.mv_shards = "::".join(shards)
    tcfg.data.shards_2d = shard_2d
    return apply_overrides(tcfg, t.overrides, where="train.overrides")


def stage_train(cfg: QuickstartConfig, out: Path, shards: list[str], shard_2d: str) -> dict:
    from mvdiff.training.trainer import train

    tcfg = train_config(cfg, out, shards, shard_2d)
    with _torch_threads(cfg.threads):
        summary = train(tcfg)
    folder = Path(tcfg.output_dir)
    return {"folder": str(folder), "model": str(folder / "model"), "log": str(folder / "log.jsonl"),
            "steps": summary["steps"], "final_loss": summary["final_loss"]}  # fmt: skip


def loss_curve_png(log_path: Path, out_path: Path, size=(640, 360)) -> int:
    """Plot ``loss`` against ``step`` of a trainer log.jsonl with PIL; returns #points."""
    from PIL import Image, ImageDraw

    by_step = {}  # a resumed run re-logs the steps after its checkpoint: keep the last
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("loss") is not None and rec["loss"] == rec["loss"]:
            by_step[float(rec["step"])] = float(rec["loss"])
    points = sorted(by_step.items())
    w, h = size
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 60, w - 20, 30, h - 40
    d.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    d.text((left, 8), "training loss (eps-MSE, mean per log window)", fill="black")
    if points:
        xs, ys = zip(*points)
        x0, x1 = min(0.0, min(xs)), max(xs) if max(xs) > 0 else 1.0
        y0, y1 = min(ys), max(ys)
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 0.5, y1 + 0.5
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad

        def px(x, y):
            return (left + (x - x0) / (x1 - x0) * (right - left),
                    bottom - (y - y0) / (y1 - y0) * (bottom - top))  # fmt: skip

        for k in range(5):
            yv = y0 + k * (y1 - y0) / 4
            _, yy = px(x0, yv)
            d.line([left, yy, right, yy], fill=(230, 230, 230))
            d.text((4, yy - 6), f"{yv:.3f}", fill=(80, 80, 80))
        for k in range(5):
            xv = x0 + k * (x1 - x0) / 4
            xx, _ = px(xv, y0)
            d.text((xx - 10, bottom + 6), f"{xv:.0f}", fill=(80, 80, 80))
        d.text(((left + right) // 2 - 12, h - 18), "step", fill="black")
        pts = [px(x, y) for x, y in points]
        if len(pts) > 1:
            d.line(pts, fill=(200, 40, 40), width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(200, 40, 40))
    save_image(out_path, im)
    return len(points)


# ---- stage 4: sample ----------------------------------------------------------------------
def stage_sample(cfg: QuickstartConfig, out: Path, model: str) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from mvdiff.pipelines import MVDreamPipeline

    s = cfg.sample
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    with _torch_threads(cfg.threads):
        pipe = MVDreamPipeline.from_pretrained(model)
        pipe.set_progress_bar_config(desc="sample", dynamic_ncols=True)
        result = pipe(
            s.prompt, num_views=s.num_views, elevation=s.elevation, height=s.resolution,
            width=s.resolution, num_inference_steps=s.steps, guidance_scale=s.guidance,
            generator=torch.Generator("cpu").manual_seed(s.seed), output_type="pil",
        )  # fmt: skip
    images = result.images
    views = []
    for v, image in enumerate(images):
        path = folder / f"view_{v:02d}.png"
        save_image(path, image)
        views.append(str(path))
    grid = Image.fromarray(np.concatenate([np.asarray(im.convert("RGB")) for im in images], 1))
    save_image(folder / "grid.png", grid)
    big = grid.resize((grid.width * 4, grid.height * 4), Image.Resampling.NEAREST)
    save_image(out / "samples.png", big)
    atomic_write(
        folder / "turntable.gif",
        lambda p: images[0].save(
            p, format="GIF", save_all=True, append_images=images[1:], duration=400, loop=0
        ),
    )
    return {"folder": str(folder), "views": views, "grid": str(folder / "grid.png"),
            "turntable": str(folder / "turntable.gif"), "prompt": s.prompt}  # fmt: skip


# ---- stage 5: text-to-3D ---------------------------------------------------------------
def stage_text3d(cfg: QuickstartConfig, out: Path, model: str) -> dict:
    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.sds.guidance import SDSConfig
    from mvdiff.sds.text_to_3d import TextTo3DConfig, text_to_3d

    t = cfg.text3d
    if not t.enabled:
        return {"enabled": False, "note": TEXT_TO_3D_OFF}
    folder = out / "text_to_3d"
    prompt = t.prompt or cfg.sample.prompt
    config = TextTo3DConfig.fast(
        prompt=prompt, steps=t.steps, seed=t.seed, hires_after=min(400, t.steps),
        save_every=max(1, t.steps // 4), sds=SDSConfig(anneal_steps=t.steps),
    )  # fmt: skip
    with _torch_threads(cfg.threads):
        pipe = MVDreamPipeline.from_pretrained(model)
        # resume=True continues from text_to_3d/checkpoint.pt after an interrupted run
        summary = text_to_3d(pipe, config, folder, resume=True, log=_say)
    return {"enabled": True, "folder": str(folder), "prompt": prompt, "steps": t.steps,
            "views": str(folder / "views.png"), "turntable": str(folder / "turntable.gif"),
            "mesh": str(folder / "mesh.obj"), "vertices": summary["vertices"],
            "faces": summary["faces"]}  # fmt: skip


# ---- stage 6: the page --------------------------------------------------------------------
def write_index(cfg: QuickstartConfig, out: Path, records: dict, timings: dict) -> Path:
    def rel(p) -> str:
        return html.escape(os.path.relpath(p, out))

    r, t, s = records["render"], records["train"], records["sample"]
    rows = [
        ("multi-view shards (docs/design.md §3)", r["folder"],
         f"{r['objects']} objects, {r['views']} views, {cfg.render.resolution}², "
         f"{cfg.render.samples} Cycles samples"),
        ("render contact sheet", r["contact_sheet"], "one row per object"),
        ("2D image-text shard (img2dataset)", records["photos"]["shard"],
         f"{records['photos']['images']} real photos with captions"),
        ("training run", t["folder"], f"{t['steps']} steps, final loss {t['final_loss']:.4f}"),
        ("trained model (diffusers folder)", t["model"], "MVDreamPipeline.from_pretrained(...)"),
        ("loss curve", str(out / "loss.png"), f"from {rel(t['log'])}"),
        ("sampled views", s["folder"], f"{len(s['views'])} views of “{s['prompt']}”"),
    ]  # fmt: skip
    d = records["text3d"]
    if d["enabled"]:
        rows.append(("text-to-3D (SDS)", d["folder"],
                     f"{d['steps']} steps, mesh {d['vertices']} vertices / {d['faces']} faces"))  # fmt: skip
    else:
        rows.append(("text-to-3D", "—", d["note"]))
    table = "\n".join(
        f"<tr><td>{html.escape(a)}</td><td><code>{rel(b) if b != '—' else b}</code></td>"
        f"<td>{html.escape(c)}</td></tr>"
        for a, b, c in rows
    )
    times = " · ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    if d["enabled"]:
        text3d = (
            f"<p>A radiance field optimised for “{html.escape(d['prompt'])}” with multi-view "
            f"SDS ({d['steps']} steps of the CPU preset, the trained model as the prior), "
            f"four views and a turntable; the mesh is <code>{rel(d['mesh'])}</code>:</p>\n"
            f'<img class="pixel" src="{rel(d["views"])}" alt="text-to-3D views" width="512">\n'
            f'<p><img class="pixel" src="{rel(d["turntable"])}" alt="text-to-3D turntable" '
            'width="192"></p>'
        )
    else:
        text3d = f"<p>{html.escape(d['note'])}.</p>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mvdiff quickstart</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
img.pixel {{ image-rendering: pixelated; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
code {{ font-size: 90%; }}
</style></head><body>
<h1>mvdiff quickstart</h1>
<p>Everything below was made on this machine by <code>mvdiff quickstart</code>: real 3D
assets rendered with Blender, a tiny random multi-view model trained on CPU jointly on the
renders and on real photos, views sampled from it, and a short text-to-3D run with it as the
prior. The model is tiny and trained for
seconds, so the samples show that the pipeline works end to end, not image quality.</p>
<p>Time: {html.escape(times)}.</p>
<h2>1. Renders</h2>
<p>{r["objects"]} bundled assets × {cfg.render.views} views (rig <code>{cfg.render.rig}</code>,
{cfg.render.resolution}², Cycles on CPU), one row per object:</p>
<img src="{rel(r["contact_sheet"])}" alt="contact sheet of the renders">
<h2>2. Training loss</h2>
<img src="loss.png" alt="training loss curve">
<h2>3. Sampled views</h2>
<p>Prompt “{html.escape(s["prompt"])}”, {len(s["views"])} views {360 / len(s["views"]):g}° apart at elevation
{cfg.sample.elevation:g}° ({cfg.sample.steps} DDIM steps, guidance {cfg.sample.guidance:g},
{cfg.sample.resolution}² shown 4× enlarged):</p>
<img class="pixel" src="samples.png" alt="sampled views">
<p><img class="pixel" src="{rel(s["turntable"])}" alt="turntable" width="128"></p>
<h2>4. Text-to-3D</h2>
{text3d}
<h2>Where everything is</h2>
<table><tr><th>output</th><th>path (relative to this page)</th><th>what</th></tr>
{table}
</table>
<p>Config: <a href="quickstart_config.yaml">quickstart_config.yaml</a> ·
summary: <a href="summary.json">summary.json</a></p>
</body></html>
"""
    path = out / "index.html"
    write_text(path, page)
    return path


# ---- the story ----------------------------------------------------------------------------
def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Run (or resume) every stage; returns the summary (also DIR/summary.json)."""
    cfg.validate()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub
    check_render_available()
    asset_inputs(cfg)  # fail before doing anything when the assets are missing
    run = _Run(cfg)
    out = run.out
    print(dump_config(cfg), flush=True)
    if run.resumed:
        _say(f"resuming the run in {out} (finished stages are skipped)")
    t_all = time.perf_counter()
    records: dict[str, dict] = {}
    timings: dict[str, float] = {}
    try:
        for i, stage in enumerate(STAGES, 1):
            previous = run.done(stage)
            if previous is not None and stage != "report":
                records[stage] = previous["record"]
                timings[stage] = previous["seconds"]
                _say(f"[{i}/{len(STAGES)}] {stage}: already done, skipped")
                continue
            _say(f"[{i}/{len(STAGES)}] {stage}: {_DESCRIBE[stage](cfg)}")
            t0 = time.perf_counter()
            if stage == "render":
                rec = stage_render(cfg, out)
            elif stage == "photos":
                rec = stage_photos(cfg, out)
            elif stage == "train":
                rec = stage_train(cfg, out, records["render"]["shards"], records["photos"]["shard"])
                loss_curve_png(Path(rec["log"]), out / "loss.png")
                rec["loss_curve"] = str(out / "loss.png")
            elif stage == "sample":
                rec = stage_sample(cfg, out, records["train"]["model"])
            elif stage == "text3d":
                rec = stage_text3d(cfg, out, records["train"]["model"])
            else:
                rec = {"index": str(write_index(cfg, out, records, timings))}
            seconds = time.perf_counter() - t0
            records[stage], timings[stage] = rec, seconds
            run.mark(stage, {"record": rec, "seconds": seconds})
            _say(f"[{i}/{len(STAGES)}] {stage}: done in {seconds:.1f} s")
        total = time.perf_counter() - t_all
        summary = {
            "output": str(out),
            "index": str(out / "index.html"),
            "seconds": round(total, 1),
            "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
            **records,
        }
        write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    finally:
        run.close()
    _print_summary(summary)
    return summary


_DESCRIBE = {
    "render": lambda c: (
        f"rendering the assets ({c.render.views} views, {c.render.resolution}², "
        f"{c.render.samples} samples) with Blender Cycles"
    ),
    "photos": lambda c: "writing the 2D image-text shard from the bundled photos",
    "train": lambda c: (
        f"training a tiny multi-view model on CPU, {c.train.max_steps} steps, "
        f"{int(round(100 * c.train.p_2d))}% 2D batches"
    ),
    "sample": lambda c: f"sampling {c.sample.num_views} views of “{c.sample.prompt}”",
    "text3d": lambda c: (
        f"text-to-3D with multi-view SDS, {c.text3d.steps} steps"
        if c.text3d.enabled
        else "text-to-3D disabled"
    ),
    "report": lambda c: "writing index.html",
}


def _print_summary(summary: dict) -> None:
    out = Path(summary["output"])
    r, t, s, d = summary["render"], summary["train"], summary["sample"], summary["text3d"]

    def p(x):
        return os.path.relpath(x) if not os.path.isabs(summary["output"]) else x

    lines = [
        f"quickstart finished in {summary['seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in summary['stage_seconds'].items())})",
        f"  renders      {p(r['folder'])}  ({r['objects']} objects, {r['views']} views; "
        f"sheet {p(r['contact_sheet'])})",
        f"  2D shard     {p(summary['photos']['shard'])}  ({summary['photos']['images']} photos)",
        f"  model        {p(t['model'])}  ({t['steps']} steps, final loss {t['final_loss']:.4f})",
        f"  loss curve   {p(t['loss_curve'])}",
        f"  samples      {p(s['grid'])}  (“{s['prompt']}”)",
        f"  text-to-3D   {p(d['mesh'])}  ({d['vertices']} vertices; turntable {p(d['turntable'])})"
        if d["enabled"]
        else f"  {d['note']}",
        f"  open         {p(out / 'index.html')}",
    ]
    print("\n".join(lines), flush=True)
