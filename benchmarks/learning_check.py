"""Does training teach multi-view consistency? A CPU-sized learning experiment (issue 9).

1. **Objects**: a few dozen procedural objects (cube / sphere / cylinder / cone, stretched
   to twice as long as deep) in one of four colours with one side (front / right / back /
   left) painted black, written as PLY meshes with per-face colours (rendered with those
   colours, no material needed). The captions name the colour and the marked side, not the
   shape ("a red object with a marked front"): like a real prompt, a caption leaves part of
   the object open — four objects share each caption — so a model must choose the shape once
   for all views, which is what joined-view attention is for; which views show the object
   long and which short, and which shows the marked side, depends on the camera.
   ``--set stretch=1`` keeps the objects round: the shapes stay distinct at 16², which is
   where per-view attention shows (mixed shapes), while nothing the models learn then
   depends on the camera.
   ``--set hidden=colour`` leaves the colours open instead ("a cube with a marked front"),
   ``hidden=none`` names everything; ``accent=""`` paints the marked side in a second colour
   from the palette.
2. **Render** them with our renderer (:func:`mvdiff.render.runner.render_objects`, Blender
   Cycles, orbit rig: 8 views 45° apart at 15° elevation, fov 40°, 32²) into multi-view
   shards (docs/design.md §3); plus a **2D image-text shard** of single random views and the bundled
   photos.
3. **Train** three small models jointly on both with the shipped trainer
   (:func:`mvdiff.training.trainer.train`, what ``mvdiff train`` runs; 30% 2D batches, ring
   of 4 views 90° apart, 16² images): ``full`` (3D self-attention + camera MLP),
   ``no_3d_attention`` (``model.attention=per_view``: the same UNet whose self-attention
   stays within each view) and ``no_camera`` (``model.camera=false``: no camera MLP,
   ``camera=None`` in training and sampling), each for every seed, ``jobs`` (2) models at a
   time in their own processes. The model works in pixel space through the exact, invertible
   :class:`~mvdiff.models.pixel_vae.PixelUnshuffleAutoencoder` (pixel-unshuffle by 2: 16² RGB
   <-> 8² x 12 latents) so that the tiny model learns images, not the noise of a random VAE;
   the starting model is :func:`mvdiff.testing.tiny_pixel_components`, written as a model
   folder: a UNet of 2 levels (8², 4²) of 32/64 channels, attention (self + cross) at both and
   in the middle block. It predicts x0 (``prediction_type=sample``; with v or epsilon
   targets, models this small and this briefly trained leave per-pixel noise in every
   sample) and its learning rate decays on a cosine (``optim.schedule=cosine``; a constant
   rate left blurred, averaged colours and shapes at this budget).
4. **Sample** 4 views (azimuth 0/90/180/270, elevation 15) for one object of every caption
   with :class:`mvdiff.pipelines.MVDreamPipeline` and **evaluate** them with
   :func:`mvdiff.eval.evaluate_views` (what ``mvdiff eval`` runs): reconstruction
   consistency (one radiance field fitted to 3 of the 4 views, each view held out in turn;
   PSNR and silhouette IoU of the held-out view) and ground-truth agreement (PSNR / SSIM
   against the renders at the same cameras of the closest of the caption's objects: the shape
   is the model's to choose, but it must be one object's shape in all four views). Reference
   rows: the renders themselves (the ceiling) and one view each of the 4 objects that share
   the caption (the floor: the best a model that draws each view on its own can do).

Prints a markdown table (mean ± std over seeds) and, last, one JSON line. ``--quick`` is a
smoke run (a few objects, few steps, one seed; under a minute, not meaningful numbers).

Budget (2 CPU cores, one torch thread per model, two models at a time): the default run
(3 seeds x 3 variants x 1500 steps) takes about 19 minutes on a quiet machine (seen twice, load 1-2.5).

    python benchmarks/learning_check.py [--quick] [--work-dir DIR] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mvdiff.config import apply_overrides, dump_config  # noqa: E402
from mvdiff.errors import UserError  # noqa: E402
from mvdiff.render.procedural import COLOURS, SHAPES, write_object  # noqa: E402

VARIANTS = ("full", "no_3d_attention", "no_camera")
# the marked side of an object: which view shows it depends on the azimuth
PATTERNS = {
    "front": "front",  # -y: seen from azimuth 0
    "right": "right side",  # +x: azimuth 90
    "back": "back",  # +y: azimuth 180
    "left": "left side",  # -x: azimuth 270
}


@dataclass
class LearningCheckConfig:
    work_dir: str = ""  # "" = a temporary folder (removed at the end)
    objects: int = 64
    object_seed: int = 0
    render_views: int = 8
    render_resolution: int = 32
    render_samples: int = 16
    render_workers: int = 2
    image_size: int = 16
    #: pixel-unshuffle factor of the exact "VAE" (latents: 3 patch² x (image_size / patch)²);
    #: model_channels must be >= 3 patch² or the first conv cannot pass the input through
    patch: int = 2
    model_channels: int = 32
    #: UNet levels with attention (1: the latents' full size, 2: half); views are joined there
    attention_resolutions: list[int] = field(default_factory=lambda: [1, 2])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    steps: int = 1500
    batch_size: int = 4
    p_2d: float = 0.3
    lr: float = 3e-3
    warmup: int = 20
    #: learning rate after warm-up: "constant" or "cosine" (to 0 at the last step)
    lr_schedule: str = "cosine"
    caption_dropout: float = 0.1
    #: rendered objects whose captions are sampled and scored (the first N: one per caption)
    eval_objects: int = 16
    #: 4-view samples per evaluation caption (different noise), each scored
    eval_samples: int = 1
    sample_steps: int = 20
    guidance: float = 3.0
    #: latents with white (the background) at 0 instead of 1
    white_zero: bool = True
    #: clip the predicted x0 to the data range while sampling (pixel-space DDPM practice:
    #: with a tiny model, eps errors at high noise blow up x0 = (x_t - s eps) / sqrt(a))
    clip_x0: bool = True
    #: training target and sampler parameterisation: "sample" (x0; default: clean samples
    #: from a tiny, briefly trained model), "v_prediction" (leaves per-pixel noise at this
    #: budget) or "epsilon" (the library's objective, mvdiff.training.loss; a tiny model's
    #: eps errors at high noise blow up x0 = (x_t - s eps) / sqrt(a))
    prediction: str = "sample"
    recon_steps: int = 60
    recon_rays: int = 512
    #: reconstruction views held out: "all" (each view in turn: 4 fits per sample) or "one"
    #: (view 1, fitted on 0, 2, 3: a quarter of the scoring time)
    holdout: str = "all"
    #: what the captions leave open: "shape" ("a red object with a marked front": several
    #: shapes share a caption), "colour" ("a cube with a marked front") or "none" (each
    #: caption fixes one object)
    hidden: str = "shape"
    #: main colours objects are drawn from (names in COLOURS)
    palette: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow"])
    #: the marked side's colour: a name in COLOURS (the same for every object), or "" for a
    #: second colour drawn from the palette
    accent: str = "black"
    #: the sides objects are marked on (names in PATTERNS)
    sides: list[str] = field(default_factory=lambda: list(PATTERNS))
    #: length / depth of every object: > 1 stretches it along x (the front is a long side),
    #: so that which views show it wide depends on the camera
    stretch: float = 2.0
    threads: int = 1  # torch threads per model
    jobs: int = 2  # models trained at once (processes)
    quick: bool = False

    @classmethod
    def quick_preset(cls, **kw) -> LearningCheckConfig:
        base = dict(objects=8, render_samples=8, seeds=[0], steps=25, eval_objects=2,
                    sample_steps=4, recon_steps=15, quick=True)  # fmt: skip
        base.update(kw)
        return cls(**base)

    def validate(self) -> LearningCheckConfig:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise UserError(f"variants: unknown {unknown}; known: {list(VARIANTS)}")
        if self.prediction not in ("epsilon", "v_prediction", "sample"):
            raise UserError(
                f"prediction must be epsilon, v_prediction or sample, got {self.prediction!r}"
            )
        if self.image_size % self.patch or self.patch & (self.patch - 1):
            raise UserError("patch must be a power of two dividing image_size")
        if self.eval_objects > self.objects or self.eval_objects < 1:
            raise UserError(f"eval_objects must be in [1, objects={self.objects}]")
        if self.work_dir and Path(self.work_dir).exists() and not Path(self.work_dir).is_dir():
            raise UserError(f"--work-dir {self.work_dir}: exists and is not a folder")
        if self.hidden not in ("shape", "colour", "none"):
            raise UserError(f"hidden must be shape, colour or none, got {self.hidden!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UserError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        bad = sorted(set(self.palette + [self.accent]) - set(COLOURS) - {""})
        if bad:
            raise UserError(f"palette / accent: unknown colours {bad}; known: {list(COLOURS)}")
        if not self.sides or set(self.sides) - set(PATTERNS):
            raise UserError(f"sides must be a non-empty list of {list(PATTERNS)}, got {self.sides}")
        if self.holdout not in ("one", "all"):
            raise UserError(f"holdout must be one or all, got {self.holdout!r}")
        if not 0.25 <= self.stretch <= 4:
            raise UserError(f"stretch must be in [0.25, 4], got {self.stretch}")
        if self.eval_samples < 1:
            raise UserError(f"eval_samples must be >= 1, got {self.eval_samples}")
        if self.render_views % 4:
            raise UserError("render_views must be a multiple of 4 (views 90° apart)")
        accents = [self.accent] if self.accent else self.palette
        pairs = sum(a != m for m in self.palette for a in accents)  # (main, accent) colourings
        distinct = len(SHAPES) * pairs * len(self.sides)
        if self.objects > distinct:
            raise UserError(f"objects={self.objects}: palette, accent and sides give only "
                            f"{distinct} different objects")  # fmt: skip
        return self


def say(msg: str) -> None:
    print(f"[learning_check] {msg}", file=sys.stderr, flush=True)


# ---- 1. procedural objects (mvdiff.render.procedural) ---------------------------------------
def caption_of(cfg: LearningCheckConfig, shape: str, main: str, accent: str, pattern: str) -> str:
    """The caption names the marked side and what ``cfg.hidden`` does not leave open."""
    side = PATTERNS[pattern]
    if cfg.hidden == "shape":  # several shapes share a caption
        return f"a {main} object with a marked {side}"
    if cfg.hidden == "colour":  # several colourings share a caption
        return f"a {shape} with a marked {side}"
    return f"a {main} {shape} with a {accent} {side}"  # the caption fixes the object


def make_objects(cfg: LearningCheckConfig, folder: Path) -> dict[str, str]:
    """Write ``cfg.objects`` PLY files; returns {uid: caption}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.object_seed)
    names, captions = list(cfg.palette), {}
    accents = [cfg.accent] if cfg.accent else names
    combos = [(s, m, a, p) for s in SHAPES for m in names for a in accents for p in cfg.sides
              if a != m]  # fmt: skip
    # round-robin over the captions so that every caption appears evenly, each time with
    # an object not used for it yet
    groups: dict[str, list] = {}
    for k in rng.permutation(len(combos)):
        groups.setdefault(caption_of(cfg, *combos[k]), []).append(combos[k])
    chosen = [g[r] for r in range(max(map(len, groups.values()))) for g in groups.values()
              if r < len(g)][: cfg.objects]  # fmt: skip
    for i, (shape, main, accent, pattern) in enumerate(chosen):
        uid = f"obj{i:03d}"
        write_object(folder / f"{uid}.ply", shape, main, accent, pattern, cfg.stretch)
        captions[uid] = caption_of(cfg, shape, main, accent, pattern)
    return captions


# ---- 2. render + 2D shard -------------------------------------------------------------------
def render(cfg: LearningCheckConfig, work: Path, captions: dict[str, str]) -> list[str]:
    import csv

    from mvdiff.render.config import RenderConfig
    from mvdiff.render.runner import render_objects

    folder = work / "renders"
    folder.mkdir(parents=True, exist_ok=True)
    with open(work / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("uid", "caption"), *captions.items()])
    rcfg = RenderConfig(
        inputs=[str(work / "objects")], output=str(folder), captions=str(work / "captions.csv"),
        rig="orbit", views=cfg.render_views, elevations=[15.0], fov=40.0,
        resolution=cfg.render_resolution, samples=cfg.render_samples,
        workers=cfg.render_workers, seed=0, shard_prefix="mv", timeout=600,
    )  # fmt: skip
    summary = render_objects(rcfg.validate(), progress=True)
    if summary["failed"]:
        raise RuntimeError(f"{summary['failed']} objects failed to render (see {folder})")
    return sorted(str(p) for p in folder.glob("mv-*.tar"))


def read_shards(shards: list[str]) -> dict[str, dict]:
    """uid -> {caption, rgba [V, 4, H, W] float, c2w [V, 4, 4], fov_deg [V]}."""
    from mvdiff.sds.ref_views import load_shard_sample
    from mvdiff.shards import MultiViewSample, read_tar

    out = {}
    for shard in shards:
        for uid, members in sorted(read_tar(shard).items()):
            meta = MultiViewSample.decode(uid, members, strict=True).meta
            out[uid] = {**load_shard_sample(shard, uid), "caption": meta["caption"], "shard": shard}
    return out


def write_2d_shard(path: Path, objects: dict[str, dict], seed: int) -> str:
    """img2dataset layout: one random single view per object (on white) + the bundled photos."""
    from PIL import Image

    from mvdiff.shards import write_tar

    rng = np.random.default_rng(seed)
    items = []
    for obj in objects.values():
        v = int(rng.integers(obj["rgba"].shape[0]))
        rgba = obj["rgba"][v]
        rgb = rgba[:3] * rgba[3:] + (1 - rgba[3:])  # over white
        arr = (rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # (3,H,W) -> (H,W,3)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        items.append((buf.getvalue(), "png", obj["caption"]))
    photos = REPO / "mvdiff" / "resources" / "photos"
    for name, caption in json.loads((photos / "captions.json").read_text()).items():
        items.append(((photos / name).read_bytes(), Path(name).suffix.lstrip(".").lower(), caption))
    return write_tar(
        path,
        (
            (f"{i:09d}", {ext: data, "txt": caption.encode()})
            for i, (data, ext, caption) in enumerate(items)
        ),
    )


# ---- 3. models: the shipped trainer -----------------------------------------------------------
def model_folder(cfg: LearningCheckConfig, seed: int, folder: Path) -> Path:
    """The starting model as a diffusers folder: :func:`mvdiff.testing.tiny_pixel_components`
    (the exact pixel-unshuffle "VAE", a 2-level UNet with a camera MLP), the text encoder all
    models share, and the sampler (:func:`sampler`)."""
    from mvdiff.testing import tiny_pixel_components, tiny_text_encoder
    from mvdiff.training.export import export_pipeline_folder

    parts = tiny_pixel_components(
        seed, patch=cfg.patch, model_channels=cfg.model_channels,
        attention_resolutions=cfg.attention_resolutions, white_zero=cfg.white_zero,
    )  # fmt: skip
    text_encoder = tiny_text_encoder(2).eval()  # the same frozen encoder for every model
    return export_pipeline_folder(folder, parts["unet"], parts["vae"], text_encoder,
                                  parts["tokenizer"], sampler(cfg))  # fmt: skip


def train_config(cfg: LearningCheckConfig, variant: str, seed: int, mv_shards, shard_2d,
                 pretrained: Path, output: Path):  # fmt: skip
    """The :class:`~mvdiff.training.config.TrainConfig` of one model: the variant is an
    ablation switch of the shipped trainer (``no_3d_attention``: ``model.attention=per_view``,
    ``no_camera``: ``model.camera=false``), the recipe is this config's (x0 target, AdamW
    without weight decay, linear warm-up then cosine to 0, clipping at 1, 30% 2D batches)."""
    from mvdiff.data.loader import DataConfig
    from mvdiff.training.config import (
        CheckpointConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
        ValidationConfig,
    )

    return TrainConfig(
        output_dir=str(output), seed=seed, max_steps=cfg.steps, caption_dropout=cfg.caption_dropout,
        prediction_type=cfg.prediction, log_every=1, export=True,
        model=ModelConfig(pretrained=str(pretrained),
                          attention="per_view" if variant == "no_3d_attention" else "joint",
                          camera=variant != "no_camera"),
        data=DataConfig(mv_shards="::".join(mv_shards), shards_2d=shard_2d, p_2d=cfg.p_2d,
                        num_views=4, resolution=cfg.image_size, batch_size=cfg.batch_size,
                        min_size_2d=cfg.image_size, shuffle_buffer=64, num_workers=0),
        optim=OptimConfig(lr=cfg.lr, weight_decay=0.0, warmup_steps=cfg.warmup,
                          schedule=cfg.lr_schedule, min_lr_ratio=0.0, max_grad_norm=1.0),
        checkpoint=CheckpointConfig(every=0, keep=1),
        validation=ValidationConfig(every=0),
    )  # fmt: skip


def train_variant(cfg, variant: str, seed: int, mv_shards, shard_2d, work: Path) -> dict:
    """Train one model with ``mvdiff.training.trainer.train`` (what ``mvdiff train`` runs);
    the data order, noise and timesteps depend on ``seed`` only. Returns the exported model
    folder and the mean loss of the last 10% of steps."""
    from mvdiff.training.trainer import train

    root = work / "models" / f"{variant}-s{seed}"
    pretrained = model_folder(cfg, seed, root / "init")
    tcfg = train_config(cfg, variant, seed, mv_shards, shard_2d, pretrained, root / "run")
    (root / "run" / "log.jsonl").unlink(missing_ok=True)  # a re-run in the same work dir
    summary = train(tcfg)
    lines = (root / "run" / "log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    tail = losses[-max(1, len(losses) // 10) :]
    return {"model": summary["model"], "final_loss": statistics.fmean(tail)}


# ---- 4. sample + evaluate --------------------------------------------------------------------
def eval_cameras(cfg):
    from mvdiff.cameras import orbit_c2w
    from mvdiff.render.rigs import framing_distance

    az = np.arange(4) * 90.0
    c2w = orbit_c2w(np.full(4, 15.0), az, framing_distance(40.0))
    return torch.from_numpy(c2w).float(), az


def sampler(cfg):
    """The official DDIM sampler predicting ``cfg.prediction``; with ``clip_x0`` the
    predicted x0 is clipped to the latent range ([-1, 1], or [-2, 2] around white-at-0
    latents in [-2, 0]). It is the model folder's scheduler (the trainer keeps it)."""
    from diffusers import DDIMScheduler

    from mvdiff.testing import ddim_scheduler

    base = ddim_scheduler()
    return DDIMScheduler.from_config(
        base.config, prediction_type=cfg.prediction, clip_sample=cfg.clip_x0,
        clip_sample_range=2.0 if cfg.white_zero else 1.0,
    )  # fmt: skip


def sample_views(cfg, model: str, prompts: list[str], seed: int) -> torch.Tensor:
    """``[P, S, 4, 3, H, W]`` in [0, 1] from the model folder: S = ``eval_samples`` objects
    per prompt, 4 views at azimuth 0/90/180/270, elevation 15."""
    from mvdiff.pipelines import MVDreamPipeline

    pipe = MVDreamPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompts, num_views=4, elevation=15.0, azimuth_start=0.0, height=cfg.image_size,
        width=cfg.image_size, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance,
        generator=torch.Generator().manual_seed(1000 + seed), output_type="pt",
        num_images_per_prompt=cfg.eval_samples,
    )  # fmt: skip
    images = out.images  # rows (prompt, object, view)
    return images.reshape(
        len(prompts), cfg.eval_samples, 4, *images.shape[1:]
    )  # (P*S*4, ...) -> (P, S, 4, ...)


def score_views(cfg, name: str, prompt: str, rgb: torch.Tensor, gt: dict | None, seed: int):
    """evaluate_views (the `mvdiff eval` path) on in-memory views ``[4, 3, H, W]``."""
    from mvdiff.eval.evaluate import evaluate_views
    from mvdiff.sds.ref_views import estimate_alpha

    c2w, _ = eval_cameras(cfg)
    alpha, _ = estimate_alpha(rgb)
    sample = {"name": name, "prompt": prompt, "rgb": rgb, "c2w": c2w,
              "rgba": torch.cat([rgb, alpha], 1),  # (V, 3, H, W) + (V, 1, H, W) -> (V, 4, H, W)
              "fov_deg": torch.full((4,), 40.0)}  # fmt: skip
    rec, rows, _ = evaluate_views(sample, gt=gt, recon_steps=cfg.recon_steps,
                                  holdout=cfg.holdout, seed=seed, recon_config=recon_config(cfg),
                                  fit_all=False)  # fmt: skip
    return rec, rows


def recon_config(cfg):
    """The reconstruction preset with fewer rays and samples per step (CPU budget; 512 rays
    are 2/3 of the 3 fitted 16² views' pixels)."""
    from mvdiff.sds.config import TextTo3DConfig

    return TextTo3DConfig.reconstruction(ref_rays=cfg.recon_rays, samples=24)


def on_white(rgba: torch.Tensor, size: int) -> torch.Tensor:
    """Renders ``[V, 4, H, W]`` -> RGB over white ``[V, 3, size, size]`` (area-resized)."""
    if rgba.shape[-1] != size:
        rgba = F.interpolate(rgba, size=(size, size), mode="area")
    return rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:])


def gt_of(obj: dict) -> dict:
    return {"uid": obj["uid"], "source": obj["shard"], "rgba": obj["rgba"], "c2w": obj["c2w"],
            "fov_deg": obj["fov_deg"]}  # fmt: skip


def metrics_of(rec: dict) -> dict:
    m = {"consistency_psnr": rec["consistency"]["psnr"],
         "consistency_psnr_holdout": rec["consistency"]["psnr_holdout"],
         "consistency_iou_holdout": rec["consistency"]["iou_holdout"]}  # fmt: skip
    if "gt" in rec:
        m.update(gt_psnr=rec["gt"]["psnr"], gt_ssim=rec["gt"]["ssim"])
    return m


def mean_metrics(records: list[dict]) -> dict:
    keys = records[0].keys()
    return {k: statistics.fmean(r[k] for r in records) for k in keys}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": [round(v, 4) for v in values]}  # fmt: skip


# ---- the experiment ----------------------------------------------------------------------------
def train_and_score(variant, seed, cfg, shards, shard_2d, eval_uids, prompts, gts, work):
    """Train one model, sample the evaluation prompts, score them (runs in a worker process).

    Returns (mean metrics, report strips, (train seconds, sample + eval seconds))."""
    torch.set_num_threads(cfg.threads)
    t = time.perf_counter()
    trained = train_variant(cfg, variant, seed, shards, shard_2d, Path(work))
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        views = sample_views(cfg, trained["model"], prompts, seed)
    recs, strips = [], {}
    for k, u in enumerate(eval_uids):
        for j in range(cfg.eval_samples):
            name = f"{variant}-s{seed}-{u}" + (f"-{j}" if cfg.eval_samples > 1 else "")
            rec, rows = score_views(cfg, name, prompts[k], views[k, j], gts[u], seed)
            recs.append(metrics_of(rec))
            strips[name] = rows
    m = mean_metrics(recs)
    m["final_loss"] = trained["final_loss"]
    return m, strips, (train_s, time.perf_counter() - t)


def run(cfg: LearningCheckConfig) -> dict:
    from mvdiff.eval.report import write_report
    from mvdiff.io import save_image

    cfg.validate()
    torch.set_num_threads(cfg.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    timings = {}
    tmp = None
    if cfg.work_dir:
        work = Path(cfg.work_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="mvdiff-learning-check-")
        work = Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        say(f"work dir {work}")
        t = time.perf_counter()
        captions = make_objects(cfg, work / "objects")
        shards = render(cfg, work, captions)
        objects = read_shards(shards)
        shard_2d = write_2d_shard(work / "photos" / "00000.tar", objects, cfg.object_seed)
        timings["objects_render"] = time.perf_counter() - t
        say(f"{len(objects)} objects rendered ({timings['objects_render']:.0f} s)")

        eval_uids = sorted(objects)[: cfg.eval_objects]
        prompts = [objects[u]["caption"] for u in eval_uids]
        _, az = eval_cameras(cfg)
        gt_index = [
            int(round(a / (360.0 / cfg.render_views))) for a in az
        ]  # orbit: view k at k*step
        all_uids = sorted(objects)
        # ground truth: every object that shares the caption (the shape is the model's to
        # choose; evaluate_views scores against the closest)
        gts = {
            u: [gt_of(objects[o]) for o in all_uids if objects[o]["caption"] == prompts[k]]
            for k, u in enumerate(eval_uids)
        }

        # reference rows at the samples' resolution: the renders (ceiling) and one view each
        # of 4 different objects with the same caption (the floor: what a model that draws
        # each view on its own, from the caption alone, gives at best)
        t = time.perf_counter()
        refs = {"renders": [], "four_objects": []}
        strips = {}
        for k, u in enumerate(eval_uids):
            gt_rgb = on_white(objects[u]["rgba"][gt_index], cfg.image_size)
            rec, rows = score_views(cfg, f"renders-{u}", prompts[k], gt_rgb, gts[u], 0)
            refs["renders"].append(metrics_of(rec))
            strips[f"renders-{u}"] = rows
            same = [o for o in all_uids if o != u and objects[o]["caption"] == prompts[k]]
            nearby = [all_uids[(all_uids.index(u) + j) % len(all_uids)] for j in range(1, 4)]
            others = [u, *(same + nearby)[:3]]
            mixed = torch.stack([objects[o]["rgba"][gt_index[j]] for j, o in enumerate(others)])
            mixed = on_white(mixed, cfg.image_size)
            rec, rows = score_views(cfg, f"four-objects-{u}", prompts[k], mixed, gts[u], 0)
            refs["four_objects"].append(metrics_of(rec))
            strips[f"four-objects-{u}"] = rows
        timings["reference_rows"] = time.perf_counter() - t
        references = {k: mean_metrics(v) for k, v in refs.items()}

        runs = {v: [] for v in cfg.variants}
        jobs = [(variant, seed) for seed in cfg.seeds for variant in cfg.variants]
        t = time.perf_counter()
        say(f"training {len(jobs)} models, {cfg.jobs} at a time")
        args = (cfg, shards, shard_2d, eval_uids, prompts, gts, str(work))
        if cfg.jobs > 1:
            import concurrent.futures as cf
            import multiprocessing as mp

            with cf.ProcessPoolExecutor(cfg.jobs, mp_context=mp.get_context("spawn")) as pool:
                done = list(pool.map(train_and_score, *zip(*[(v, s, *args) for v, s in jobs])))
        else:
            done = [train_and_score(v, s, *args) for v, s in jobs]
        train_s = eval_s = 0.0
        for (variant, seed), (m, rows, seconds) in zip(jobs, done):
            runs[variant].append(m)
            strips.update(rows)
            train_s, eval_s = train_s + seconds[0], eval_s + seconds[1]
            say(f"{variant} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
        timings["train_and_evaluate_wall"] = time.perf_counter() - t
        timings["train_cpu_process_sum"], timings["sample_eval_process_sum"] = train_s, eval_s

        variants = {v: {k: spread([r[k] for r in rs]) for k in rs[0]} for v, rs in runs.items()}
        seconds = time.perf_counter() - t0
        result = {
            "benchmark": "learning_check",
            "quick": cfg.quick,
            "variants": variants,
            "references": references,
            "seconds": round(seconds, 1),
            "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "torch_threads": torch.get_num_threads(),
            "config": asdict(cfg),
        }
        if cfg.work_dir:
            write_report(work / "report", {"summary": {}, "samples": []}, strips)
            result["report"] = str(work / "report" / "report.html")
            save_image(work / "comparison.png", comparison_image(cfg, strips, eval_uids, prompts))
            result["comparison"] = str(work / "comparison.png")
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def comparison_image(cfg, strips: dict, uids: list[str], prompts: list[str], count: int = 8):
    """One block per caption (the first ``count``; first seed, first sample): each variant's
    4 views and the renders of the caption's evaluation object, captions above the blocks."""
    from PIL import Image, ImageDraw

    from mvdiff.eval.report import strip_image

    seed, suffix = cfg.seeds[0], "-0" if cfg.eval_samples > 1 else ""
    blocks = []
    for u, prompt in list(zip(uids, prompts))[:count]:
        rows = [(v, strips[f"{v}-s{seed}-{u}{suffix}"][0][1]) for v in cfg.variants]
        rows.append(("renders", strips[f"renders-{u}"][0][1]))
        strip = strip_image(rows, tile=48)
        block = Image.new("RGB", (strip.width, strip.height + 18), "white")
        block.paste(strip, (0, 18))
        ImageDraw.Draw(block).text((6, 3), f'"{prompt}"', fill="black")
        blocks.append(block)
    cols = 2
    width, height = blocks[0].width, blocks[0].height
    rows_n = math.ceil(len(blocks) / cols)
    out = Image.new("RGB", (cols * width + (cols - 1) * 12, rows_n * height), "white")
    for i, block in enumerate(blocks):
        out.paste(block, ((i % cols) * (width + 12), (i // cols) * height))
    return out


def markdown_table(result: dict) -> str:
    cols = [("consistency_psnr", "recon. PSNR (all views) dB"),
            ("consistency_psnr_holdout", "recon. PSNR (held-out view) dB"),
            ("consistency_iou_holdout", "recon. silhouette IoU (held-out view)"),
            ("gt_psnr", "GT PSNR dB (closest object)"),
            ("gt_ssim", "GT SSIM (closest object)")]  # fmt: skip
    three = {"gt_ssim", "consistency_iou_holdout"}  # shown with 3 decimals
    head = "| model | " + " | ".join(c[1] for c in cols) + " | final loss |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    n = len(result["config"]["seeds"])
    for v, stats in result["variants"].items():
        cells = [f"{stats[k]['mean']:.2f} ± {stats[k]['std']:.2f}" if k not in three
                 else f"{stats[k]['mean']:.3f} ± {stats[k]['std']:.3f}" for k, _ in cols]  # fmt: skip
        loss = stats["final_loss"]
        lines.append(f"| {v} ({n} seeds) | " + " | ".join(cells)
                     + f" | {loss['mean']:.4f} ± {loss['std']:.4f} |")  # fmt: skip
    for name, label in (("renders", "ground-truth renders (ceiling)"),
                        ("four_objects", "4 views of 4 different objects (floor)")):  # fmt: skip
        m = result["references"][name]
        cells = [f"{m[k]:.2f}" if k not in three else f"{m[k]:.3f}" for k, _ in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " | — |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke run: few objects/steps, one seed")
    p.add_argument("--work-dir", default="", help="keep renders, report and data here "
                   "(re-runs reuse the renders); default: a temporary folder")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a LearningCheckConfig value, e.g. --set steps=600")  # fmt: skip
    args = p.parse_args(argv)
    base = LearningCheckConfig.quick_preset() if args.quick else LearningCheckConfig()
    base.work_dir = args.work_dir
    try:
        cfg = apply_overrides(base, args.overrides).validate()
    except UserError as e:
        print(f"learning_check: error: {e}", file=sys.stderr)
        return 2
    print(dump_config(cfg), file=sys.stderr, flush=True)
    result = run(cfg)
    print(markdown_table(result))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
