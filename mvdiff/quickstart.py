"""The quickstart: the whole mvdiff story on a laptop CPU in a few minutes, ending with a
model that has learned something you can check.

``mvdiff quickstart --output DIR`` runs, top to bottom, with the real library code:

1. **render**: writes the procedural vocabulary (:mod:`mvdiff.render.procedural`: "a {red,
   green, blue, yellow} {cube, sphere, cylinder, cone}", 16 PLY objects) and renders it
   together with the bundled real 3D assets (``tests/fixtures/assets``: glTF + OBJ) with
   Blender Cycles (:func:`mvdiff.render.runner.render_objects`, an orbit of views at 15°
   elevation) into multi-view shards (docs/design.md §3);
2. **photos**: a 2D image-text shard (img2dataset layout): one random view of every rendered
   object and the bundled real photos (``mvdiff/resources/photos``) with their captions;
3. **train**: a small multi-view model *from scratch* on CPU jointly on both, with the
   trainer of ``mvdiff train`` (:func:`mvdiff.training.trainer.train`), which exports a
   diffusers-format model folder;
4. **sample**: 4 views (azimuth 0/90/180/270) for several vocabulary prompts with
   :class:`mvdiff.pipelines.MVDreamPipeline` from that folder, each **scored** against the
   renders of the named object at the same cameras (:mod:`mvdiff.eval.vocabulary`: does the
   view show the named colour, silhouette IoU, which shape the silhouettes read as);
5. **text3d**: text-to-3D (multi-view SDS, :func:`mvdiff.sds.text_to_3d.text_to_3d`) with the
   trained model as the prior: views, turntable, mesh; the mesh is rendered with the same
   renderer and cameras as the real objects (the mesh preview) and scored the same way;
6. **report**: ``DIR/index.html``: per prompt the views, turntable, mesh preview and the
   renders of the real object side by side, with the measured agreement.

Layout of ``DIR``::

    quickstart_config.yaml   the resolved config (a re-run must match it)
    objects/                 the procedural PLY objects
    renders/                 mv-*.tar shards, manifest.jsonl, captions.csv
    photos/00000.tar         the 2D image-text shard
    train/                   config.yaml, log.jsonl, checkpoints/, model/ (diffusers folder)
    samples/PROMPT/          view_00.png ... grid.png, turntable.gif (one folder per prompt)
    text_to_3d/              views.png, turntable.gif, mesh.obj/.glb/.ply, preview/ (renders)
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
import re
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mvdiff.config import config_to_dict, save_config
from mvdiff.errors import UserError
from mvdiff.io import atomic_write, save_image, write_text
from mvdiff.render.procedural import COLOURS, SHAPES, VOCABULARY_COLOURS

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
#: the cameras every sample is drawn and scored at: 4 views 90° apart (orbit views 0, V/4, ...)
SAMPLE_AZIMUTHS = (0.0, 90.0, 180.0, 270.0)
_PROMPT = re.compile(r"^a (\w+) (\w+)$")


def vocabulary_of(prompt: str) -> tuple[str, str] | None:
    """(colour, shape) of a vocabulary prompt ("a red cube"), else None."""
    m = _PROMPT.match(prompt.strip())
    if m and m.group(1) in COLOURS and m.group(2) in SHAPES:
        return m.group(1), m.group(2)
    return None


# ---- config -------------------------------------------------------------------------------
@dataclass
class RenderStage:
    #: the procedural vocabulary: one object per (colour, shape)
    colours: list[str] = field(default_factory=lambda: list(VOCABULARY_COLOURS))
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    #: real asset files or folders rendered with them; empty = the bundled assets
    #: (tests/fixtures/assets); ["none"] = none
    assets: list[str] = field(default_factory=list)
    #: views per object on an orbit 360/views degrees apart (a multiple of 4: the samples'
    #: cameras 90° apart are among them)
    views: int = 8
    elevation: float = 15.0
    fov: float = 40.0
    resolution: int = 32
    samples: int = 8
    workers: int = 0  # 0 = one per CPU core
    timeout: float = 300.0


@dataclass
class PhotoStage:
    #: a folder of photos + captions.json ({file: caption}); empty = the bundled photos
    folder: str = ""
    #: random single views of every rendered object added to the 2D shard
    views_per_object: int = 1


@dataclass
class TrainStage:
    #: 1000 steps: every sample of the default prompts in its named colour and shape (600:
    #: "a red cone" drawn orange-yellow, spheres and cylinders read as cubes)
    max_steps: int = 1000
    #: objects per multi-view batch (each num_views views); 2D batches hold as many images
    batch_size: int = 4
    #: training (and sampling) resolution: the model works on pixels, so keep it small
    resolution: int = 16
    num_views: int = 4
    p_2d: float = 0.3
    lr: float = 3.0e-3
    warmup_steps: int = 20
    #: learning rate after warm-up (cosine: to 0 at the last step; a constant rate leaves
    #: blurred, averaged colours and shapes at this budget, benchmarks/learning_check.py)
    schedule: str = "cosine"
    #: what the UNet predicts: "sample" (x0; clean samples from a small, briefly trained
    #: model), "v_prediction" or "epsilon" (both leave per-pixel noise at this budget)
    prediction_type: str = "sample"
    #: pixel-unshuffle factor of the exact pixel-space "VAE"
    #: (:class:`mvdiff.models.pixel_vae.PixelUnshuffleAutoencoder`)
    patch: int = 2
    #: UNet width: 2 levels of model_channels and twice that
    model_channels: int = 32
    caption_dropout: float = 0.1
    log_every: int = 25
    checkpoint_every: int = 250
    #: extra ``key=value`` overrides of the TrainConfig (e.g. ["optim.warmup_steps=10"])
    overrides: list[str] = field(default_factory=list)


@dataclass
class SampleStage:
    #: prompts sampled and scored; "a {colour} {shape}" prompts of the vocabulary are scored
    #: for colour, silhouette and shape, captions of the real assets for silhouette
    prompts: list[str] = field(
        default_factory=lambda: [
            "a red cube",
            "a green sphere",
            "a blue cylinder",
            "a yellow cone",
            "a blue cube",
            "a red cone",
        ]  # fmt: skip
    )
    steps: int = 20
    #: classifier-free guidance; low: with this small model, 3 and more blur the shapes
    #: (fewer silhouettes read as the named shape) and wash out colours
    guidance: float = 2.0
    seed: int = 0


@dataclass
class Text3DStage:
    enabled: bool = True
    #: "" = the first of sample.prompts
    prompt: str = ""
    #: 400 steps at guidance 50: the mesh of "a red cube" reads as a cube (silhouette IoU
    #: 0.76 against the cube's renders, 0.73 against the sphere's, seeds 0 and 1); at 150
    #: steps and guidance 20 it read as a sphere
    steps: int = 400
    #: classifier-free guidance of the SDS prior
    guidance: float = 50.0
    #: render size of the field (resized to the model's resolution for the prior)
    render_size: int = 32
    seed: int = 0
    #: render the exported mesh with the renderer of the real objects (mesh preview + score)
    preview: bool = True


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
        r, t = self.render, self.train
        if t.max_steps < 1:
            raise UserError(f"train.max_steps must be >= 1, got {t.max_steps}")
        if r.views < 4 or r.views % 4:
            raise UserError(
                f"render.views must be a multiple of 4 (views 90° apart), got {r.views}"
            )
        if r.views < t.num_views:
            raise UserError(f"render.views ({r.views}) must be >= train.num_views ({t.num_views})")
        bad = sorted(set(r.colours) - set(COLOURS)) + sorted(set(r.shapes) - set(SHAPES))
        if bad:
            raise UserError(f"render.colours / render.shapes: unknown {bad}; known: "
                            f"{list(COLOURS)} and {list(SHAPES)}")  # fmt: skip
        if t.resolution < 8 or t.resolution % 8:
            raise UserError(
                f"train.resolution must be a positive multiple of 8, got {t.resolution}"
            )
        if t.patch < 1 or t.patch & (t.patch - 1) or t.resolution % t.patch:
            raise UserError(f"train.patch must be a power of two dividing train.resolution, "
                            f"got {t.patch}")  # fmt: skip
        if t.model_channels < 3 * t.patch**2:
            raise UserError(f"train.model_channels must be >= 3 patch² = {3 * t.patch**2}")
        if r.resolution < t.resolution:
            raise UserError(f"render.resolution ({r.resolution}) must be >= train.resolution "
                            f"({t.resolution})")  # fmt: skip
        if not 0 <= self.photos.views_per_object <= r.views:
            raise UserError(f"photos.views_per_object must be in [0, render.views={r.views}], "
                            f"got {self.photos.views_per_object}")  # fmt: skip
        if not self.sample.prompts or not all(p.strip() for p in self.sample.prompts):
            raise UserError("sample.prompts must be a non-empty list of non-empty prompts")
        if self.text3d.enabled and self.text3d.steps < 1:
            raise UserError(f"text3d.steps must be >= 1, got {self.text3d.steps}")
        return self

    def text3d_prompt(self) -> str:
        return self.text3d.prompt or self.sample.prompts[0]


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
    if cfg.render.assets == ["none"]:
        return []
    if cfg.render.assets:
        return list(cfg.render.assets)
    if not ASSETS_DIR.is_dir():
        raise UserError(
            f"the bundled 3D assets ({ASSETS_DIR}) are not there (they ship with the source "
            "checkout: pip install -e .); give your own with --set render.assets=[DIR], or "
            "--set render.assets=[none]"
        )
    return [str(ASSETS_DIR)]


def stage_render(cfg: QuickstartConfig, out: Path) -> dict:
    from mvdiff.render.config import RenderConfig
    from mvdiff.render.procedural import write_vocabulary
    from mvdiff.render.runner import render_objects
    from mvdiff.render.shards import check_shard, contact_sheet

    r = cfg.render
    vocabulary = write_vocabulary(out / "objects", r.colours, r.shapes)
    folder = out / "renders"
    folder.mkdir(parents=True, exist_ok=True)
    captions = folder / "captions.csv"

    def write_captions(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["uid", "caption"])
            w.writerows({**vocabulary, **ASSET_CAPTIONS}.items())

    atomic_write(captions, write_captions)
    rcfg = RenderConfig(
        inputs=[str(out / "objects"), *asset_inputs(cfg)], output=str(folder),
        captions=str(captions), rig="orbit", views=r.views, elevations=[r.elevation], fov=r.fov,
        resolution=r.resolution, samples=r.samples, workers=r.workers, timeout=r.timeout,
        seed=cfg.seed, shard_prefix="mv",
    )  # fmt: skip
    summary = render_objects(rcfg.validate(), progress=True)
    shards = sorted(folder.glob("mv-*.tar"))
    reports = [check_shard(s) for s in shards]
    errors = [e for rep in reports for e in rep["errors"]]
    if errors:
        raise RuntimeError(f"rendered shards fail the schema check: {errors[:3]}")
    objects = sum(rep["samples"] for rep in reports)
    missing = sorted(set(vocabulary) - set(read_renders(shards)))
    if missing:
        raise UserError(f"procedural objects not rendered: {missing} "
                        f"(see {folder / 'manifest.jsonl'})")  # fmt: skip
    sheet = out / "renders.png"
    tmp = out / ".renders.tmp.png"  # contact_sheet picks the format from the suffix
    contact_sheet(shards, tmp, max_samples=objects, max_views=r.views, tile=48)
    os.replace(tmp, sheet)
    return {"folder": str(folder), "shards": [str(s) for s in shards], "objects": objects,
            "vocabulary": len(vocabulary), "assets": objects - len(vocabulary),
            "views": sum(rep["views"] for rep in reports), "failed": summary["failed"],
            "contact_sheet": str(sheet)}  # fmt: skip


def read_renders(shards) -> dict[str, dict]:
    """uid -> {caption, rgba [V, 4, H, W] in [0, 1], c2w [V, 4, 4], fov_deg [V]} of every
    object in the multi-view shards."""
    from mvdiff.sds.ref_views import load_shard_sample

    out = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
            uids = sorted({Path(n).name.split(".")[0] for n in names})
            metas = {u: json.loads(tar.extractfile(f"{u}.json").read()) for u in uids}
        for uid in uids:
            out[uid] = {**load_shard_sample(shard, uid), "caption": metas[uid].get("caption", "")}
    return out


# ---- stage 2: the 2D shard ----------------------------------------------------------------
def stage_photos(cfg: QuickstartConfig, out: Path, shards: list[str]) -> dict:
    import numpy as np
    from PIL import Image

    from mvdiff.shards import write_members

    src = Path(cfg.photos.folder) if cfg.photos.folder else PHOTOS_DIR
    captions_file = src / "captions.json"
    if not captions_file.is_file():
        raise UserError(f"photos.folder {src}: no captions.json ({{file: caption}})")
    captions = json.loads(captions_file.read_text())
    items = []  # (bytes, ext, caption, source)
    rng = np.random.default_rng(cfg.seed)
    for uid, obj in sorted(read_renders(shards).items()):
        for v in rng.choice(len(obj["rgba"]), cfg.photos.views_per_object, replace=False):
            rgba = obj["rgba"][int(v)]
            rgb = rgba[:3] * rgba[3:] + (1 - rgba[3:])  # over white, (3, H, W)
            arr = (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # -> (H, W, 3)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            items.append((buf.getvalue(), "png", obj["caption"], f"renders/{uid} view {v}"))
    for name, caption in sorted(captions.items()):
        path = src / name
        if not path.is_file():
            raise UserError(f"photos.folder {src}: {name} (in captions.json) is missing")
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(im.format)
        if ext is None:
            raise UserError(f"photos.folder {src}: {name} is not a JPEG/PNG/WebP")
        source = f"mvdiff/resources/photos/{name}" if src == PHOTOS_DIR else str(path)
        items.append((data, ext, caption, source))
    shard = out / "photos" / "00000.tar"

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (data, ext, caption, source) in enumerate(items):
                with Image.open(io.BytesIO(data)) as im:
                    width, height = im.size
                key = f"{i:09d}"
                meta = {"key": key, "caption": caption, "width": width, "height": height,
                        "source": source}  # fmt: skip
                members = {ext: data, "txt": caption.encode(), "json": json.dumps(meta).encode()}
                write_members(tar, key, members)

    atomic_write(shard, write)
    return {"shard": str(shard), "images": len(items), "photos": len(captions),
            "views": len(items) - len(captions)}  # fmt: skip


# ---- stage 3: train -----------------------------------------------------------------------
def initial_model(cfg: QuickstartConfig, folder: Path) -> Path:
    """The untrained model ``train`` starts from, as a diffusers folder: a small random
    multi-view UNet on the exact pixel-space "VAE" (:func:`mvdiff.testing.
    tiny_pixel_components`) and a DDIM sampler that clips its x0 estimate to the latent range
    (white-at-0 pixels: [-2, 0])."""
    from diffusers import DDIMScheduler

    from mvdiff.testing import tiny_pixel_components
    from mvdiff.training.export import export_pipeline_folder

    if (folder / "model_index.json").is_file():
        return folder  # deterministic in the config: a resumed run reuses it
    t = cfg.train
    parts = tiny_pixel_components(cfg.seed, patch=t.patch, model_channels=t.model_channels)
    base = parts["scheduler"]
    parts["scheduler"] = DDIMScheduler.from_config(
        base.config, clip_sample=True, clip_sample_range=2.0, prediction_type=t.prediction_type
    )
    return export_pipeline_folder(folder, **parts)


def train_config(cfg: QuickstartConfig, out: Path, shards: list[str], shard_2d: str):
    """The TrainConfig of the joint run (what ``train/configs/tiny_cpu.yaml`` sets, with the
    pixel-space model of :func:`initial_model`)."""
    from mvdiff.config import apply_overrides
    from mvdiff.training.config import TrainConfig

    t = cfg.train
    base = [
        f"output_dir={out / 'train'}", f"seed={cfg.seed}", f"max_steps={t.max_steps}",
        'mixed_precision="no"', f"caption_dropout={t.caption_dropout}",
        f"log_every={t.log_every}", f"prediction_type={t.prediction_type}",
        f"model.pretrained={out / 'model_init'}",
        f"data.num_views={t.num_views}", f"data.resolution={t.resolution}",
        f"data.batch_size={t.batch_size}", f"data.p_2d={t.p_2d}",
        f"data.min_size_2d={t.resolution}", "data.shuffle_buffer=64", "data.num_workers=0",
        f"optim.lr={t.lr}", f"optim.warmup_steps={t.warmup_steps}",
        f"optim.schedule={t.schedule}", "optim.weight_decay=0.0", "optim.max_grad_norm=1.0",
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

    with _torch_threads(cfg.threads):
        initial_model(cfg, out / "model_init")
        tcfg = train_config(cfg, out, shards, shard_2d)
        summary = train(tcfg)
    folder = Path(tcfg.output_dir)
    return {"folder": str(folder), "model": str(folder / "model"), "log": str(folder / "log.jsonl"),
            "steps": summary["steps"], "final_loss": summary["final_loss"],
            "initial_model": str(out / "model_init")}  # fmt: skip


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
    d.text((left, 8), "training loss (MSE of the prediction, mean per log window)", fill="black")
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


# ---- stage 4: sample and score ------------------------------------------------------------
def slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_") or "prompt"


def reference_views(obj: dict, size: int):
    """The renders of ``obj`` at the sample cameras (orbit views 0, V/4, V/2, 3V/4: azimuth
    0/90/180/270) as (RGB over white ``[4, 3, size, size]``, alpha ``[4, 1, size, size]``)."""
    from mvdiff.eval.vocabulary import on_white

    n = obj["rgba"].shape[0]
    return on_white(obj["rgba"][[k * n // 4 for k in range(4)]], size)


def score_views(cfg: QuickstartConfig, rgb, prompt: str, renders: dict) -> dict:
    """Agreement of views ``[4, 3, H, W]`` (over white, at the sample cameras) with the
    renders of the object captioned ``prompt`` (:mod:`mvdiff.eval.vocabulary`)."""
    from mvdiff.eval.vocabulary import shape_read, shows_colour, silhouette_iou

    uid = next((u for u, o in sorted(renders.items()) if o["caption"] == prompt), None)
    rec = {"prompt": prompt, "object": uid}
    if uid is None:
        rec["note"] = "no rendered object has this caption: not scored"
        return rec
    size = rgb.shape[-1]
    _, alpha = reference_views(renders[uid], size)
    ious = silhouette_iou(rgb, alpha)
    rec.update(silhouette_iou=[round(x, 3) for x in ious],
               silhouette_iou_mean=round(sum(ious) / len(ious), 3))  # fmt: skip
    named = vocabulary_of(prompt)
    if named is not None:
        colour, shape = named
        palette = {c: COLOURS[c] for c in cfg.render.colours}
        shows = shows_colour(rgb, colour, palette)
        alphas = {s: reference_views(renders[f"{colour}_{s}"], size)[1]
                  for s in cfg.render.shapes if f"{colour}_{s}" in renders}  # fmt: skip
        read, scores = shape_read(rgb, alphas)
        rec.update(colour=colour, shape=shape, views_showing_colour=shows,
                   colour_agreement=round(sum(shows) / len(shows), 3), shape_read=read,
                   shape_scores={k: round(v, 3) for k, v in scores.items()})  # fmt: skip
    return rec


def agreement_line(rec: dict) -> str:
    """One line of the measured agreement of a scored record."""
    if "silhouette_iou_mean" not in rec:
        return rec.get("note", "not scored")
    parts = []
    if "colour" in rec:
        shown = sum(rec["views_showing_colour"])
        parts.append(f"{rec['colour']} in {shown}/{len(rec['views_showing_colour'])} views")
    parts.append(f"silhouette IoU {rec['silhouette_iou_mean']:.2f}")
    if "shape_read" in rec:
        ok = "as named" if rec["shape_read"] == rec["shape"] else f"named {rec['shape']}"
        parts.append(f"reads as a {rec['shape_read']} ({ok})")
    return ", ".join(parts)


def _tiles(images, scale: int):
    """``[V, 3, H, W]`` in [0, 1] -> a PIL strip, views side by side, ``scale``x enlarged."""
    import numpy as np
    from PIL import Image

    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    strip = Image.fromarray(np.concatenate(list(arr), 1))  # (V, H, W, 3) -> (H, V*W, 3)
    return strip.resize((strip.width * scale, strip.height * scale), Image.Resampling.NEAREST)


def _grid(views, scale: int):
    """``[P, V, 3, H, W]`` -> a PIL image, one row of views per prompt, enlarged."""
    import numpy as np
    from PIL import Image

    rows = [np.asarray(_tiles(v, scale)) for v in views]
    return Image.fromarray(np.concatenate(rows, 0))  # P x (H', V*W', 3) -> (P*H', V*W', 3)


def stage_sample(cfg: QuickstartConfig, out: Path, model: str, shards: list[str]) -> dict:
    import torch
    from PIL import Image

    from mvdiff.pipelines import MVDreamPipeline

    s, size = cfg.sample, cfg.train.resolution
    prompts = list(s.prompts)
    with _torch_threads(cfg.threads):
        pipe = MVDreamPipeline.from_pretrained(model)
        pipe.set_progress_bar_config(desc="sample", dynamic_ncols=True)
        result = pipe(
            prompts, num_views=4, elevation=cfg.render.elevation, azimuth_start=0.0,
            height=size, width=size, num_inference_steps=s.steps, guidance_scale=s.guidance,
            generator=torch.Generator("cpu").manual_seed(s.seed), output_type="pt",
        )  # fmt: skip
    views = result.images.float().reshape(
        len(prompts), 4, 3, size, size
    )  # (P*4, ...) -> (P, 4, ...)
    renders = read_renders(shards)
    records = []
    for prompt, rgb in zip(prompts, views):
        folder = out / "samples" / slug(prompt)
        images = [_tiles(v[None], 1) for v in rgb]
        paths = []
        for v, image in enumerate(images):
            paths.append(str(save_image(folder / f"view_{v:02d}.png", image)))
        save_image(folder / "grid.png", _tiles(rgb, 1))
        save_image(folder / "views_x4.png", _tiles(rgb, 4))
        big = [im.resize((size * 4, size * 4), Image.Resampling.NEAREST) for im in images]
        atomic_write(folder / "turntable.gif", lambda p, big=big: big[0].save(
            p, format="GIF", save_all=True, append_images=big[1:], duration=400, loop=0))  # fmt: skip
        rec = score_views(cfg, rgb, prompt, renders)
        if rec["object"] is not None:
            ref, _ = reference_views(renders[rec["object"]], size)
            rec["renders"] = str(save_image(folder / "renders_x4.png", _tiles(ref, 4)))
        rec.update(folder=str(folder), views=paths, grid=str(folder / "grid.png"),
                   views_x4=str(folder / "views_x4.png"),
                   turntable=str(folder / "turntable.gif"))  # fmt: skip
        records.append(rec)
    save_image(out / "samples.png", _grid(views, 4))
    scored = [r for r in records if "colour" in r]
    shown = [x for r in scored for x in r["views_showing_colour"]]
    return {"prompts": records, "resolution": size, "steps": s.steps, "guidance": s.guidance,
            "colour_views_shown": sum(shown), "colour_views": len(shown)}  # fmt: skip


# ---- stage 5: text-to-3D ---------------------------------------------------------------
def stage_text3d(cfg: QuickstartConfig, out: Path, model: str, shards: list[str]) -> dict:
    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.sds.background import BackgroundConfig
    from mvdiff.sds.guidance import SDSConfig
    from mvdiff.sds.text_to_3d import TextTo3DConfig, text_to_3d

    t = cfg.text3d
    if not t.enabled:
        return {"enabled": False, "note": TEXT_TO_3D_OFF}
    folder = out / "text_to_3d"
    prompt = cfg.text3d_prompt()
    config = TextTo3DConfig.fast(
        prompt=prompt, steps=t.steps, seed=t.seed, render_size=t.render_size,
        render_size_late=t.render_size, hires_after=t.steps, save_every=max(1, t.steps // 3),
        mesh_faces=5000, texture_size=256, turntable_frames=12,
        sds=SDSConfig(anneal_steps=t.steps, guidance_scale=t.guidance),
        # the prior knows only what it was trained on: the renders' elevation, field of view
        # and framing distance, on white (a random background colour is an image it has
        # never seen, and it answers with a colour it was never asked for)
        sds_elevation_range=[cfg.render.elevation] * 2, sds_fov_range=[cfg.render.fov] * 2,
        sds_distance_range=[1.0, 1.0], background=BackgroundConfig(random_prob=0.0),
    )  # fmt: skip
    with _torch_threads(cfg.threads):
        pipe = MVDreamPipeline.from_pretrained(model)
        # resume=True continues from text_to_3d/checkpoint.pt after an interrupted run
        summary = text_to_3d(pipe, config, folder, resume=True, log=_say, progress=False)
    rec = {"enabled": True, "folder": str(folder), "prompt": prompt, "steps": t.steps,
           "guidance": t.guidance, "views": str(folder / "views.png"),
           "turntable": str(folder / "turntable.gif"), "mesh": str(folder / "mesh.obj"),
           "mesh_glb": str(folder / "mesh.glb"), "vertices": summary["vertices"],
           "faces": summary["faces"]}  # fmt: skip
    if t.preview:
        rec.update(mesh_preview(cfg, folder, prompt, read_renders(shards)))
    return rec


def mesh_preview(cfg: QuickstartConfig, folder: Path, prompt: str, renders: dict) -> dict:
    """Render ``folder/mesh.glb`` with the renderer and cameras of the real objects
    (``folder/preview``) and score it like the samples."""
    from mvdiff.eval.vocabulary import on_white
    from mvdiff.render.config import RenderConfig
    from mvdiff.render.runner import render_objects
    from mvdiff.sds.ref_views import load_shard_sample

    r = cfg.render
    preview = folder / "preview"
    rcfg = RenderConfig(
        inputs=[str(folder / "mesh.glb")], output=str(preview), rig="fixed", views=4,
        azimuths=list(SAMPLE_AZIMUTHS), elevations=[r.elevation], fov=r.fov,
        resolution=r.resolution, samples=r.samples, workers=1, timeout=r.timeout,
        seed=cfg.seed, shard_prefix="mesh",
    )  # fmt: skip
    render_objects(rcfg.validate(), progress=False)
    shards = sorted(preview.glob("mesh-*.tar"))
    if not shards:
        raise RuntimeError(f"the mesh preview did not render (see {preview / 'manifest.jsonl'})")
    rgb, _ = on_white(load_shard_sample(shards[0])["rgba"], r.resolution)
    path = save_image(folder / "mesh_preview.png", _tiles(rgb, 2))
    score = score_views(cfg, rgb, prompt, renders)
    if score["object"] is not None:
        ref, _ = reference_views(renders[score["object"]], r.resolution)
        score["renders"] = str(save_image(folder / "renders_x2.png", _tiles(ref, 2)))
    return {"mesh_preview": str(path), "mesh_agreement": score}


# ---- stage 6: the page --------------------------------------------------------------------
def write_index(cfg: QuickstartConfig, out: Path, records: dict, timings: dict) -> Path:
    def rel(p) -> str:
        return html.escape(os.path.relpath(p, out))

    esc = html.escape
    r, ph, t, s, d = (records[k] for k in ("render", "photos", "train", "sample", "text3d"))
    size = s["resolution"]
    total = sum(timings.values())
    times = " · ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    rows = []
    for rec in s["prompts"]:
        is_t3d = d.get("enabled") and d["prompt"] == rec["prompt"]
        preview = (f'<img class="pixel" src="{rel(d["mesh_preview"])}" width="256" '
                   'alt="mesh preview">' if is_t3d and "mesh_preview" in d else "—")  # fmt: skip
        renders = (f'<img class="pixel" src="{rel(rec["renders"])}" width="256" alt="renders">'
                   if "renders" in rec else "no rendered object has this caption")  # fmt: skip
        rows.append(
            f"<tr><td>“{esc(rec['prompt'])}”</td>"
            f'<td><img class="pixel" src="{rel(rec["views_x4"])}" width="256" alt="views"></td>'
            f'<td><img class="pixel" src="{rel(rec["turntable"])}" width="64" alt="turntable">'
            f"</td><td>{preview}</td><td>{renders}</td>"
            f"<td>{esc(agreement_line(rec))}</td></tr>"
        )
    shown, n_views = s["colour_views_shown"], s["colour_views"]
    if d.get("enabled"):
        m = d.get("mesh_agreement", {})
        mesh_line = (f"<p>Measured on the mesh preview: <b>{esc(agreement_line(m))}</b>.</p>"
                     if m else "")  # fmt: skip
        preview = (f'<p>The mesh (<code>{rel(d["mesh"])}</code>, {d["vertices"]} vertices) '
                   "rendered with the renderer and cameras of the real objects, then the "
                   "renders of the real object:</p>"
                   f'<img class="pixel" src="{rel(d["mesh_preview"])}" width="512" alt="mesh">'
                   f'<br><img class="pixel" src="{rel(m["renders"])}" width="512" alt="renders">'
                   if "mesh_preview" in d and "renders" in m else "")  # fmt: skip
        text3d = (
            f"<p>A radiance field optimised for “{esc(d['prompt'])}” with multi-view SDS "
            f"({d['steps']} steps, guidance {d['guidance']:g}) with the trained model as the "
            f"prior, its views at azimuth 0/90/180/270 and a turntable:</p>\n"
            f'<img class="pixel" src="{rel(d["views"])}" alt="text-to-3D views" width="512">\n'
            f'<img class="pixel" src="{rel(d["turntable"])}" alt="turntable" width="128">\n'
            f"{preview}\n{mesh_line}"
        )
    else:
        text3d = f"<p>{esc(d['note'])}.</p>"
    files = [
        ("procedural objects (PLY)", str(out / "objects"),
         f"{r['vocabulary']} objects: a {{{', '.join(cfg.render.colours)}}} "
         f"{{{', '.join(cfg.render.shapes)}}}"),
        ("multi-view shards (docs/design.md §3)", r["folder"],
         f"{r['objects']} objects × {cfg.render.views} views, {cfg.render.resolution}²"),
        ("2D image-text shard (img2dataset)", ph["shard"],
         f"{ph['views']} single views + {ph['photos']} real photos"),
        ("training run", t["folder"], f"{t['steps']} steps, final loss {t['final_loss']:.4f}"),
        ("trained model (diffusers folder)", t["model"], "MVDreamPipeline.from_pretrained(...)"),
        ("samples", str(out / "samples"), "one folder per prompt: views, grid, turntable"),
    ]  # fmt: skip
    if d.get("enabled"):
        files.append(("text-to-3D", d["folder"], "views, turntable, mesh.obj / .glb / .ply"))
    table = "\n".join(
        f"<tr><td>{esc(a)}</td><td><code>{rel(b)}</code></td><td>{esc(c)}</td></tr>"
        for a, b, c in files
    )
    tc = cfg.train
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mvdiff quickstart</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; vertical-align: middle; }}
img.pixel {{ image-rendering: pixelated; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
code {{ font-size: 90%; }}
</style></head><body>
<h1>mvdiff quickstart</h1>
<p>Everything on this page was made on this machine by <code>mvdiff quickstart</code> in
{total:.0f} s: {r["vocabulary"]} procedural objects and {r["assets"]} real assets rendered with
Blender, a small multi-view diffusion model trained <b>from scratch</b> on the CPU
({t["steps"]} steps, {size}² pixels, jointly on the renders and a 2D shard), views sampled
from it for text prompts, and text-to-3D with it as the prior.</p>
<p>What to expect: the model knows only what it was shown — the objects
“a {{{esc(", ".join(cfg.render.colours))}}} {{{esc(", ".join(cfg.render.shapes))}}}” and
the {r["assets"]} assets — at {size}×{size} pixels. It is not a general text-to-3D model;
it shows the idea of the project: a prompt becomes views of the named object from 4 cameras,
the same object in every view, and those views guide a 3D shape.</p>
<p><b>Measured</b>, not judged by eye, against the renders of the named object at the same
cameras: a view <i>shows</i> a colour when at least half of its foreground pixels (pixels
away from the white background) are nearest to that colour among
{esc(", ".join(cfg.render.colours))}; <i>silhouette IoU</i> compares the foreground with the
render's alpha; <i>reads as</i> is the shape whose renders' silhouettes agree best.
Over the vocabulary prompts, <b>{shown} of {n_views} sampled views show the named
colour</b>.</p>
<h2>1. Prompts, sampled views and the real object</h2>
<p>4 views at azimuth 0/90/180/270, elevation {cfg.render.elevation:g}°
({s["steps"]} DDIM steps, guidance {s["guidance"]:g}; {size}² shown enlarged).</p>
<table><tr><th>prompt</th><th>sampled views</th><th>turntable</th><th>text-to-3D mesh
preview</th><th>renders of the real object</th><th>measured agreement</th></tr>
{chr(10).join(rows)}
</table>
<h2>2. Text-to-3D</h2>
{text3d}
<h2>3. What it was trained on</h2>
<p>{r["objects"]} objects × {cfg.render.views} views (orbit at {cfg.render.elevation:g}°,
{cfg.render.resolution}², Cycles on CPU), one row per object; plus a 2D shard of
{ph["views"]} single views and {ph["photos"]} real photos ({tc.p_2d:.0%} of the batches).</p>
<img class="pixel" src="{rel(r["contact_sheet"])}" alt="contact sheet of the renders" width="768">
<p>Training loss (prediction type <code>{esc(tc.prediction_type)}</code>, learning rate
{tc.lr:g} with a {esc(tc.schedule)} schedule, pixel-space model through the exact
pixel-unshuffle “VAE”):</p>
<img src="loss.png" alt="training loss curve">
<h2>Where everything is</h2>
<table><tr><th>output</th><th>path (relative to this page)</th><th>what</th></tr>
{table}
</table>
<p>Time: {esc(times)} (CPU load average {os.getloadavg()[0]:.1f} on
{os.cpu_count()} cores when the page was written: other work on the machine slows every
stage). Config: <a href="quickstart_config.yaml">quickstart_config.yaml</a> ·
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
    _say(f"config {out / 'quickstart_config.yaml'}: {cfg.train.max_steps} training steps, "
         f"{len(cfg.sample.prompts)} prompts, text-to-3D "
         f"{'“' + cfg.text3d_prompt() + '”' if cfg.text3d.enabled else 'off'}")  # fmt: skip
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
            shards = records.get("render", {}).get("shards", [])
            if stage == "render":
                rec = stage_render(cfg, out)
            elif stage == "photos":
                rec = stage_photos(cfg, out, shards)
            elif stage == "train":
                rec = stage_train(cfg, out, shards, records["photos"]["shard"])
                loss_curve_png(Path(rec["log"]), out / "loss.png")
                rec["loss_curve"] = str(out / "loss.png")
            elif stage == "sample":
                rec = stage_sample(cfg, out, records["train"]["model"], shards)
                for p in rec["prompts"]:
                    _say(f"  “{p['prompt']}”: {agreement_line(p)}")
            elif stage == "text3d":
                rec = stage_text3d(cfg, out, records["train"]["model"], shards)
                if "mesh_agreement" in rec:
                    _say(f"  mesh of “{rec['prompt']}”: {agreement_line(rec['mesh_agreement'])}")
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
            "seconds": round(sum(timings.values()), 1),  # all stages, resumed ones included
            "seconds_this_run": round(total, 1),
            "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "cpu_count": os.cpu_count(),
            **records,
        }
        write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    finally:
        run.close()
    _print_summary(summary)
    return summary


_DESCRIBE = {
    "render": lambda c: (
        f"writing {len(c.render.colours) * len(c.render.shapes)} procedural objects and "
        f"rendering them with the real assets ({c.render.views} views, {c.render.resolution}², "
        f"{c.render.samples} samples) with Blender Cycles"
    ),
    "photos": lambda c: "writing the 2D image-text shard (single views + the bundled photos)",
    "train": lambda c: (
        f"training a multi-view model from scratch on CPU, {c.train.max_steps} steps at "
        f"{c.train.resolution}², {int(round(100 * c.train.p_2d))}% 2D batches"
    ),
    "sample": lambda c: f"sampling 4 views for {len(c.sample.prompts)} prompts and scoring them",
    "text3d": lambda c: (
        f"text-to-3D of “{c.text3d_prompt()}” with multi-view SDS, {c.text3d.steps} steps"
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
        f"  2D shard     {p(summary['photos']['shard'])}  ({summary['photos']['images']} images)",
        f"  model        {p(t['model'])}  ({t['steps']} steps, final loss {t['final_loss']:.4f})",
        f"  samples      {p(out / 'samples')}  ({s['colour_views_shown']} of {s['colour_views']} "
        "views show the named colour)",
        *(f"    “{rec['prompt']}”: {agreement_line(rec)}" for rec in s["prompts"]),
        f"  text-to-3D   {p(d['mesh'])}  ({d['vertices']} vertices; turntable {p(d['turntable'])})"
        if d["enabled"]
        else f"  {d['note']}",
    ]
    if d.get("mesh_agreement"):
        lines.append(f"    mesh of “{d['prompt']}”: {agreement_line(d['mesh_agreement'])}")
    lines.append(f"  open         {p(out / 'index.html')}")
    print("\n".join(lines), flush=True)
