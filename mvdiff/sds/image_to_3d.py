"""Image -> 3D (Make-It-3D stage 1 with ImageDream's image-conditioned multi-view prior).

One photo is a posed reference view at a front camera (azimuth 0, ``ref_elevation_deg``,
``ref_fov_deg``, the camera at the distance that frames the unit box as in training;
:mod:`mvdiff.cameras` convention), fitted with the RGB + mask losses of
:func:`mvdiff.sds.loop.ref_view_loss`; novel views get multi-view SDS
(:class:`ImageConditionedSDS`) from an ImageDream UNet conditioned on the photo: its vision
tower tokens (``image_embeds``) and its VAE latent as the extra zero-camera reference frame
(``reference_latents``), with the official unconditional input (zero tokens, zero latent).
With a depth map, the negative Pearson correlation of the rendered depth and the given one
on the object's pixels (scale/shift invariant, as Make-It-3D) is added.

The loop is :func:`mvdiff.sds.loop.run_steps`; the outputs are those of text-to-3d
(:func:`mvdiff.sds.text_to_3d.export_outputs`) plus ``input.png`` (the photo as fitted),
``reference.png`` (the final render at the reference camera) and, in ``summary.json``,
``reference_psnr`` / ``reference_iou`` (render vs photo, opacity vs mask).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from mvdiff.accel import enable_tf32
from mvdiff.cameras import orbit_c2w
from mvdiff.config import validate_config
from mvdiff.errors import UserError
from mvdiff.io import save_image, write_json
from mvdiff.sds.config import TextTo3DConfig
from mvdiff.sds.guidance import MultiViewSDS, SDSConfig
from mvdiff.sds.loop import (
    FitState,
    fit_with_checkpoints,
    load_checkpoint,
    make_fit_state,
    restore,
)
from mvdiff.sds.recon import psnr, silhouette_iou
from mvdiff.sds.ref_views import _read_png, composite, estimate_alpha
from mvdiff.sds.render import render_rays
from mvdiff.sds.text_to_3d import SDSTerm, export_outputs, framing_distance

logger = logging.getLogger(__name__)

__all__ = [
    "ImageConditionedSDS",
    "ImageTo3DConfig",
    "depth_loss",
    "image_to_3d",
    "load_depth",
    "load_photo",
    "reference_view",
]

#: The fewest object pixels (mask > 0.5) a photo must have.
MIN_OBJECT_PIXELS = 16
#: CFG scale of ImageDream's own image-to-3D runs (MVDream's text-to-3D uses 50).
IMAGEDREAM_GUIDANCE = 5.0


@dataclass
class ImageTo3DConfig(TextTo3DConfig):
    """:class:`TextTo3DConfig` plus the reference camera, the photo's background for the
    prior and the depth term. ``ref_fov_deg`` is the reference camera's field of view."""

    ref_elevation_deg: float = 0.0
    #: grey level an RGBA photo is composited over before the vision tower and the VAE
    image_background: float = 1.0
    depth_weight: float = 0.05
    #: what the depth map holds: "disparity" (larger = nearer; monocular estimators such as
    #: DPT/MiDaS) or "depth" (larger = farther)
    depth_kind: Literal["disparity", "depth"] = "disparity"
    #: the object is cropped, scaled to this fraction of the frame and centred (about the
    #: size of a unit-box asset in training renders at the default fov); None keeps the
    #: photo's own framing
    ref_object_fraction: float | None = 0.55
    sds: SDSConfig = dataclasses.field(
        default_factory=lambda: SDSConfig(guidance_scale=IMAGEDREAM_GUIDANCE)
    )
    # Novel-view cameras: ImageDream's own ranges, from its threestudio config
    # bytedance/ImageDream configs/imagedream-sd21-shading.yaml (data: elevation_range [0, 5],
    # fovy_range [45, 50], camera_distance_range [0.6, 0.75] with the multi-view datamodule's
    # relative_radius=true, threestudio/data/random_multiview.py; azimuths: n_view=4 evenly
    # spaced with a random offset over threestudio's default [-180, 180], as here).
    sds_elevation_range: list[float] = dataclasses.field(default_factory=lambda: [0.0, 5.0])
    sds_fov_range: list[float] = dataclasses.field(default_factory=lambda: [45.0, 50.0])
    sds_distance_mode: Literal["framing", "relative"] = "relative"
    sds_distance_range: list[float] = dataclasses.field(default_factory=lambda: [0.6, 0.75])

    @classmethod
    def fast(cls, **kw) -> ImageTo3DConfig:
        kw.setdefault("sds", SDSConfig(anneal_steps=600, guidance_scale=IMAGEDREAM_GUIDANCE))
        return super().fast(**kw)

    def validate(self) -> None:
        super().validate()
        if not -89.0 <= self.ref_elevation_deg <= 89.0:
            raise ValueError(
                f"ref_elevation_deg must be in [-89, 89], got {self.ref_elevation_deg}"
            )
        if not 0.0 < self.ref_fov_deg < 180.0:
            raise ValueError(f"ref_fov_deg must be in (0, 180), got {self.ref_fov_deg}")
        f = self.ref_object_fraction
        if f is not None and not 0.05 <= f <= 1.0:
            raise ValueError(f"ref_object_fraction must be in [0.05, 1] or null, got {f}")
        if not 0.0 <= self.image_background <= 1.0:
            raise ValueError(f"image_background must be in [0, 1], got {self.image_background}")


class ImageConditionedSDS(MultiViewSDS):
    """:class:`MultiViewSDS` with ImageDream's image prompt: every group of V views gets the
    photo as an extra, last frame (zero camera; its latent is written by the UNet from
    ``reference_latents``), the conditional half the photo's ``image_embeds`` ``[1, T, E]`` and
    ``reference_latents`` ``[1, C, h, w]``, the unconditional half zeros of both (the
    official uncond). ``reference_latents=None``: image tokens only (no extra frame)."""

    def __init__(self, unet, vae, alphas_cumprod, config, image_embeds, reference_latents=None):
        super().__init__(unet, vae, alphas_cumprod, config)
        self.image_embeds, self.reference_latents = image_embeds, reference_latents

    def predict_noise(self, noisy, t: int, cond, uncond, camera, num_views: int):
        n, c, h, w = noisy.shape
        b = n // num_views  # objects
        ref = self.reference_latents
        f = num_views + (ref is not None)  # frames per object the UNet sees
        x = noisy
        cam = camera
        if ref is not None:
            if camera is None:
                raise ValueError("the reference frame needs a UNet with cameras")
            if ref.shape[-2:] != (h, w):
                raise ValueError(f"reference latent {tuple(ref.shape)} vs SDS latents {(h, w)}")
            per_obj = noisy.reshape(b, num_views, c, h, w)  # (B*V, C, h, w) -> (B, V, C, h, w)
            # (B, V, C, h, w) + (B, 1, C, h, w) -> (B, F, C, h, w) -> (B*F, C, h, w)
            x = torch.cat([per_obj, per_obj.new_zeros(b, 1, c, h, w)], 1).reshape(b * f, c, h, w)
            per_cam = camera.reshape(b, num_views, -1)  # (B*V, 16) -> (B, V, 16)
            zero = per_cam.new_zeros(b, 1, per_cam.shape[-1])
            cam = torch.cat([per_cam, zero], 1).reshape(b * f, -1)  # (B, F, 16) -> (B*F, 16)
        m = b * f
        cond = cond.expand(m, *cond.shape[1:])  # (1, L, D) -> (B*F, L, D)
        uncond = uncond.expand(m, *uncond.shape[1:])  # (1, L, D) -> (B*F, L, D)
        emb = self.image_embeds.to(noisy.device).expand(b, *self.image_embeds.shape[1:])
        kwargs = {"image_embeds": torch.cat([emb, torch.zeros_like(emb)])}  # (2B, T, E)
        if ref is not None:
            r = ref.to(noisy.device).expand(b, c, h, w)  # (1, C, h, w) -> (B, C, h, w)
            kwargs["reference_latents"] = torch.cat([r, torch.zeros_like(r)])  # (2B, C, h, w)
        x2 = torch.cat([x, x])  # (B*F, C, h, w) -> (2*B*F, C, h, w)
        cam2 = None if cam is None else torch.cat([cam, cam])  # (B*F, 16) -> (2*B*F, 16)
        ts = torch.full((2 * m,), t, dtype=torch.long, device=noisy.device)
        with self._autocast(noisy.device):
            eps = self.unet(
                x2, ts, encoder_hidden_states=torch.cat([cond, uncond]), camera=cam2,
                num_views=f, **kwargs,
            )  # fmt: skip
        eps = eps.sample.float()
        # (2*B*F, C, h, w) -> (2, B, F, C, h, w) -> drop the reference frame -> (2, B*V, C, h, w)
        eps = eps.reshape(2, b, f, c, h, w)[:, :, :num_views].reshape(2, n, c, h, w)
        return eps[0], eps[1]


def _place(x: torch.Tensor, box, size: int, fraction: float | None, fill) -> torch.Tensor:
    """``x`` ``[1, C, H, W]`` cropped to ``box`` (top, left, bottom, right), resized so that its
    longer side is ``fraction * size`` (None: not resized) and centred on a ``size``² canvas
    of ``fill`` ``[C]`` -> ``[1, C, size, size]``."""
    top, left, bottom, right = box
    crop = x[..., top:bottom, left:right]
    h, w = bottom - top, right - left
    if fraction is not None:
        k = fraction * size / max(h, w)
        h, w = max(1, min(size, round(h * k))), max(1, min(size, round(w * k)))
        crop = F.interpolate(crop, size=(h, w), mode="bilinear", antialias=True)
    fill = torch.as_tensor(fill, dtype=x.dtype).reshape(1, -1, 1, 1)  # (C,) -> (1, C, 1, 1)
    out = fill.expand(1, x.shape[1], size, size).clone()
    top, left = (size - h) // 2, (size - w) // 2
    out[..., top : top + h, left : left + w] = crop
    return out


def load_photo(path, object_fraction: float | None = None) -> dict:
    """The photo as a square straight-alpha ``rgba`` ``[1, 4, S, S]`` in [0, 1] (S: its longer
    side). RGB photos: mask and ``background`` ``[3]`` estimated from the border colour, as
    ``--ref-views`` folders. ``object_fraction``: the object (mask > 0.5) is cropped, scaled so
    that its longer side is that fraction of S and centred (None: the photo's own framing,
    padded to a square). Also ``has_alpha``, ``array`` (``[S, S, C]`` uint8, the photo as
    framed, for the prior) and ``frame`` (what :func:`load_depth` repeats)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such photo")
    arr = _read_png(path, str(path))  # (H, W, 3|4) uint8; unreadable -> one line
    has_alpha = arr.shape[-1] == 4
    x = torch.from_numpy(arr.copy()).float().permute(2, 0, 1)[None] / 255  # (1, C, H, W)
    background = None
    if not has_alpha:
        alpha, background = estimate_alpha(x)
        x = torch.cat([x, alpha], 1)  # (1, 3, H, W) -> (1, 4, H, W)
    mask = x[0, 3] > 0.5
    if int(mask.sum()) < MIN_OBJECT_PIXELS:
        how = "its alpha is empty" if has_alpha else "nothing differs from the border colour"
        raise UserError(f"{path}: no object in the photo ({how}); give an RGBA cut-out")
    h, w = mask.shape
    box = (0, 0, h, w)
    if object_fraction is not None:
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    size = max(h, w)
    a = x[:, 3:]
    if has_alpha:  # resampled premultiplied, so transparent pixels do not bleed in
        premul = torch.cat([x[:, :3] * a, a], 1)  # (1, 4, H, W)
        placed = _place(premul, box, size, object_fraction, [0.0] * 4)
        a2 = placed[:, 3:].clamp(0, 1)
        rgb = (placed[:, :3] / a2.clamp(min=1e-6)).clamp(0, 1) * (a2 > 0)
    else:
        fill = [*background.tolist(), 0.0]
        placed = _place(x, box, size, object_fraction, fill)
        rgb, a2 = placed[:, :3].clamp(0, 1), placed[:, 3:].clamp(0, 1)
    x = torch.cat([rgb, a2], 1)  # (1, 4, S, S)
    channels = 4 if has_alpha else 3
    array = (x[0, :channels].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return {
        "rgba": x,
        "background": background,
        "has_alpha": has_alpha,
        "array": array,  # (S, S, C) uint8
        "frame": {"shape": (h, w), "box": box, "size": size, "fraction": object_fraction},
    }


def load_depth(path, photo: dict) -> torch.Tensor:
    """A depth/disparity map of the photo (8- or 16-bit grey PNG, or RGB: its first channel;
    the photo's size), framed as the photo was -> ``[1, 1, S, S]`` float."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--depth {path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im).astype(np.float32)
    except Exception as e:
        text = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--depth {path}: not a readable image ({text})") from None
    if arr.ndim == 3:
        arr = arr[..., 0]
    frame = photo["frame"]
    if not np.isfinite(arr).all() or arr.shape != tuple(frame["shape"]):
        h, w = frame["shape"]
        raise UserError(
            f"--depth {path}: must be a finite map of the photo's size ({w}x{h}), "
            f"got {arr.shape[1]}x{arr.shape[0]}"
        )
    d = torch.from_numpy(arr)[None, None]  # (H, W) -> (1, 1, H, W)
    fill = [float(np.median(arr))]
    return _place(d, frame["box"], frame["size"], frame["fraction"], fill)


def reference_view(photo: dict, config: ImageTo3DConfig) -> dict:
    """The photo as a posed view (``prepare_rays`` input): one front camera."""
    fov = float(config.ref_fov_deg)
    c2w = orbit_c2w(np.array([config.ref_elevation_deg]), np.array([0.0]), framing_distance(fov))
    return {
        "uid": "photo",
        "rgba": photo["rgba"],
        "c2w": torch.from_numpy(c2w).float(),  # (1, 4, 4)
        "fov_deg": torch.tensor([fov]),
        "background": photo["background"],
        "has_alpha": photo["has_alpha"],
    }


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm() + 1e-8)


def depth_loss(fit: FitState, depth_rays: dict, config: ImageTo3DConfig) -> torch.Tensor:
    """1 - Pearson(rendered depth, given depth) on a random batch of the object's rays
    (disparity maps are negated first): invariant to the map's scale and shift."""
    n = depth_rays["o"].shape[0]
    idx = torch.arange(n)
    if 0 < config.ref_rays < n:
        idx = torch.randint(n, (config.ref_rays,), generator=fit.generator)
    dev = fit.device
    out = render_rays(
        fit.field, depth_rays["o"][idx].to(dev), depth_rays["d"][idx].to(dev), config.samples,
        stratified=True, generator=fit.render_generator, occupancy=fit.occupancy,
    )  # fmt: skip
    pred = (out["depth"] / out["opacity"].clamp(min=1e-3)).reshape(-1)  # (R, 1) -> (R,)
    target = depth_rays["depth"][idx].to(dev)
    if config.depth_kind == "disparity":
        target = -target
    return 1.0 - _pearson(pred, target)


class ImageTo3DTerm:
    """The per-step terms besides the reference RGB/mask: SDS (``sds_weight``) and depth
    (``depth_weight``), in the prior slot of :func:`mvdiff.sds.loop.train_step` (which then
    runs with weight 1)."""

    def __init__(self, config: ImageTo3DConfig, sds=None, depth_rays=None):
        self.config, self.sds, self.depth_rays = config, sds, depth_rays

    def __call__(self, fit, config, step: int, size: int):
        loss, t = torch.zeros((), device=fit.device), None
        if self.sds is not None and self.config.sds_weight > 0:
            sds_loss, t = self.sds(fit, self.config, step, size)
            loss = loss + self.config.sds_weight * sds_loss
        if self.depth_rays is not None and self.config.depth_weight > 0:
            loss = loss + self.config.depth_weight * depth_loss(fit, self.depth_rays, self.config)
        return loss, t


def image_sds_term(pipe, photo: dict, config: ImageTo3DConfig) -> SDSTerm:
    """The SDS term with the photo as ImageDream's image prompt (tokens + reference frame)."""
    import PIL.Image

    if not pipe.has_image_prompt or pipe.image_encoder is None or pipe.feature_extractor is None:
        raise UserError(
            "--model: no image prompt/image encoder (not an ImageDream model); convert an "
            "ImageDream checkpoint: mvdiff convert sd-v2.1-base-4view-ipmv.pt OUT "
            "--original-config sd-v2-base-ipmv.yaml"
        )
    if not getattr(pipe, "has_camera_mlp", True):
        raise UserError("--model: the reference frame needs a multi-view UNet with cameras")
    image = pipe.composite_image(PIL.Image.fromarray(photo["array"]), config.image_background)
    guidance = ImageConditionedSDS(
        pipe.unet, pipe.vae, pipe.scheduler.alphas_cumprod, config.sds, None, None
    )
    r = guidance.resolution  # the reference latent has the SDS latents' size
    gen = torch.Generator().manual_seed(config.seed)
    embeds, ref = pipe.encode_image([image], r, r, gen)  # (1, T, E), (1, 4, r/8, r/8)
    guidance.image_embeds, guidance.reference_latents = embeds.float(), ref.float()
    cond = pipe.encode_prompt([config.prompt + config.prompt_suffix]).float()  # (1, L, D)
    uncond = pipe.encode_prompt([config.negative_prompt]).float()  # (1, L, D)
    return SDSTerm(guidance, cond, uncond, use_camera=True)


def image_to_3d(
    pipe,
    config: ImageTo3DConfig,
    photo_path,
    output,
    depth_path=None,
    resume: bool = False,
    log=logger.info,
    progress: bool = True,
    device=None,
) -> dict:
    """Fit a field to the photo at ``photo_path`` (+ SDS with ``pipe``, an ImageDream
    :class:`MVDreamPipeline`, when ``sds_weight`` > 0; + depth from ``depth_path``) and write
    the outputs (module docstring) into ``output``; ``resume`` continues from
    ``output/checkpoint.pt`` (written every ``save_every`` steps and at the end). Returns the
    summary."""
    from PIL import Image

    validate_config(config)
    photo = load_photo(photo_path, config.ref_object_fraction)
    size = photo["rgba"].shape[-1]
    depth = load_depth(depth_path, photo) if depth_path is not None else None
    if depth is not None and config.representation != "field":
        raise UserError("--depth: the depth loss needs representation field")
    if config.sds_weight > 0 and pipe is None:
        raise ValueError("sds_weight > 0 needs a pipeline (the prior)")
    sds = image_sds_term(pipe, photo, config) if config.sds_weight > 0 else None
    if device is None:
        device = pipe.unet.device if pipe is not None else torch.device("cpu")

    view = reference_view(photo, config)
    res = config.ref_resolution or min(size, config.render_size_late)
    enable_tf32(device)
    fit = make_fit_state(config, device)
    rays = fit.prepare_ref(view, res, None)
    depth_rays = None
    if depth is not None:  # field: rays of the object's pixels
        d = F.interpolate(depth, size=(res, res), mode="area").reshape(-1)  # (1,1,r,r) -> (r*r,)
        keep = rays["rgba"][:, 3] > 0.5
        depth_rays = {"o": rays["o"][keep], "d": rays["d"][keep], "depth": d[keep]}
    if not photo["has_alpha"]:
        log("photo has no alpha: mask estimated from the background colour")
    log(f"reference view: {photo_path} at elevation {config.ref_elevation_deg}°, "
        f"fov {config.ref_fov_deg}°, fitted at {res}²")  # fmt: skip

    output = Path(output)
    ckpt_path = output / "checkpoint.pt"
    start = 0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, device)  # tensors and plain data only; else one line
        now = config.to_dict()
        for key in ("representation", "ref_object_fraction", *fit.config_keys):
            saved_value = state["config"].get(key)
            if saved_value is not None and saved_value != now[key]:
                raise UserError(
                    f"--resume {ckpt_path}: saved with {key} {saved_value}, now {now[key]}; "
                    "use the same settings or a new --output"
                )
        start = restore(fit, state, ckpt_path)
        log(f"resumed from {ckpt_path} at step {start}")
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "config.json", config.to_dict())
    term = None
    if sds is not None or depth_rays is not None:
        term = ImageTo3DTerm(config, sds, depth_rays)
    loop_config = dataclasses.replace(config, sds_weight=1.0 if term is not None else 0.0)
    t0 = time.time()
    metrics = fit_with_checkpoints(
        fit, config, ckpt_path, start, start if resume and ckpt_path.exists() else None,
        loop_config=loop_config, sds=term, rays=rays, progress=progress, desc="image-to-3d",
    )  # fmt: skip

    # the reference view as fitted and as rendered now, over the same background
    bg = photo["background"]
    if bg is None:
        bg = torch.tensor(config.background.color, dtype=torch.float32)
    target = F.interpolate(photo["rgba"], size=(res, res), mode="area")  # (1, 4, r, r)
    with torch.no_grad():
        out = fit.render(view["c2w"], view["fov_deg"], res, background=bg.to(fit.device))
    rgb, opacity = out["rgb"].cpu(), out["opacity"].cpu()  # (1, 3, r, r), (1, 1, r, r)
    want = composite(target, bg)
    ref_psnr, ref_iou = psnr(rgb, want), silhouette_iou(opacity, target[:, 3:4])
    for name, img in (("input.png", want), ("reference.png", rgb)):
        arr = img[0].clamp(0, 1).permute(1, 2, 0).numpy()  # (3, r, r) -> (r, r, 3)
        save_image(output / name, Image.fromarray((arr * 255 + 0.5).astype(np.uint8)))
    asset = export_outputs(fit, config, output)  # meshes (+ gaussians.ply for Gaussians)
    summary = {
        "steps": config.steps, "resumed_from": start, "loss": metrics["loss"], "t": metrics["t"],
        "vertices": asset["mesh"]["vertices"], "faces": asset["mesh"]["faces"],
        "mesh": asset["mesh"], "metrics": asset["metrics"], "stage_seconds": asset["seconds"],
        "reference_psnr": round(ref_psnr, 3), "reference_iou": round(ref_iou, 4),
        "seconds": round(time.time() - t0, 2),
    }  # fmt: skip
    write_json(output / "summary.json", summary)
    return summary
