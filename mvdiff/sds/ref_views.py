"""Posed reference views for reconstruction, and their losses.

Two sources (``--ref-views``):

* a multi-view shard in our schema (docs/design.md §3): straight-alpha RGBA views, ``cameras.npy``
  c2w matrices and ``fov_deg`` in the sample's JSON;
* the output folder of ``mvdiff sample``: ``view_XX.png`` (RGB, no alpha) and ``cameras.json``
  (per view ``c2w`` with a unit-length translation, elevation, azimuth; no field of view).
  The camera is put at the distance that frames the unit box as in training
  (``(sqrt(3)/2) / sin(fov/2)``, fov from ``cameras.json`` if it has one, else the given
  default), and, lacking alpha, the background colour is taken from the image border and a
  soft mask estimated from the distance to it. Such views carry their ``background`` so that
  the renders are composited over that same colour.

Loaders return a dict: ``rgba`` ``[V, 4, H, W]`` in [0, 1] (straight alpha), ``c2w``
``[V, 4, 4]``, ``fov_deg`` ``[V]``, ``uid``, ``background`` (``[3]`` for RGB views, else None)
and ``has_alpha``.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mvdiff.cameras import framing_distance
from mvdiff.errors import UserError
from mvdiff.shards import MultiViewSample, SampleInvalid, iter_tar_samples, view_member

__all__ = [
    "composite",
    "estimate_alpha",
    "load_ref_views",
    "load_sample_folder",
    "load_shard_sample",
    "posed_view_loss",
    "prepare_rays",
]


def composite(rgba: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Straight-alpha ``[V, 4, H, W]`` over a background ``[3]`` or ``[V, 3]`` -> ``[V, 3, H, W]``."""
    v = rgba.shape[0]
    bg = background.to(rgba).reshape(-1, 3).expand(v, 3)[:, :, None, None]  # (V, 3) -> (V, 3, 1, 1)
    a = rgba[:, 3:4]
    return rgba[:, :3] * a + bg * (1.0 - a)


def posed_view_loss(out: dict, target_rgba: torch.Tensor, background, mask_weight: float = 0.5):
    """MSE of the render (over ``background``) against the target composited over the same
    background, plus ``mask_weight`` * MSE of opacity against the target alpha (images)."""
    bg = torch.as_tensor(background, dtype=target_rgba.dtype)
    rgb_loss = F.mse_loss(out["rgb"], composite(target_rgba, bg))
    mask_loss = F.mse_loss(out["opacity"], target_rgba[:, 3:4])
    return rgb_loss + mask_weight * mask_loss


def estimate_alpha(rgb: torch.Tensor, lo: float = 0.03, hi: float = 0.12):
    """(alpha ``[V, 1, H, W]``, background ``[3]``) for RGB views ``[V, 3, H, W]`` on a plain
    background: the median colour of the image borders, and a soft mask rising from 0 to 1 as
    the largest channel difference to it goes from ``lo`` to ``hi``."""
    border = torch.cat(
        [rgb[:, :, 0], rgb[:, :, -1], rgb[:, :, :, 0], rgb[:, :, :, -1]], dim=-1
    )  # 4 x (V, 3, W) -> (V, 3, 4W)
    flat = border.permute(1, 0, 2).reshape(3, -1)  # (V, 3, 4W) -> (3, V, 4W) -> (3, V*4W)
    bg = flat.median(dim=1).values  # (3, V*4W) -> (3,)
    diff = (rgb - bg[None, :, None, None]).abs().amax(dim=1, keepdim=True)  # (V, 1, H, W)
    return ((diff - lo) / (hi - lo)).clamp(0.0, 1.0), bg


#: The most pixels a reference view may have (a declared size above it is not decoded).
MAX_VIEW_PIXELS = 4096 * 4096


def _read_png(data_or_path, where: str) -> np.ndarray:
    """Decode one view (RGB or RGBA uint8 ``[H, W, C]``); anything that is not an image of at
    most :data:`MAX_VIEW_PIXELS` pixels is a :class:`UserError` naming ``where``."""
    import warnings

    from PIL import Image

    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                if im.width * im.height > MAX_VIEW_PIXELS:
                    raise UserError(f"{where}: {im.width}x{im.height} pixels is too large")
                mode = "RGBA" if ("A" in im.getbands() or "transparency" in im.info) else "RGB"
                return np.asarray(im.convert(mode))
    except UserError:
        raise
    except Exception as e:  # not an image, truncated, a decompression bomb, ...
        text = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{where}: not a readable image ({text})") from None


def _check_views(imgs: list, c2w: np.ndarray, fov: np.ndarray, where: str) -> None:
    """What ``mvdiff shard-info`` checks of views and cameras: one size for all views, proper
    rigid camera transforms ``[V, 4, 4]`` (finite, orthonormal), fields of view in (0, 180)."""
    from mvdiff.shards import check_cameras

    if len({i.shape[:2] for i in imgs}) != 1:
        raise UserError(f"{where}: views differ in size")
    try:
        check_cameras(c2w, len(imgs))
    except SampleInvalid as e:
        raise UserError(f"{where}: {e}") from None
    if not (np.isfinite(fov).all() and (fov > 0).all() and (fov < 180).all()):
        raise UserError(f"{where}: fields of view must be finite degrees in (0, 180)")


def load_shard_sample(path, uid: str | None = None) -> dict:
    """One sample (``uid``, or the first) of a multi-view shard tar (docs/design.md §3), checked as
    ``mvdiff shard-info`` checks it; problems are one-line :class:`UserError`\\ s naming the
    shard and the sample."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ref-views {path}: no such shard file or sample folder")
    found = None
    try:
        with open(path, "rb") as f:
            for key, members in iter_tar_samples(f, str(path)):
                if uid is None or key == uid:
                    found = key, members
                    break
    except (tarfile.TarError, SampleInvalid, OSError, UnicodeDecodeError) as e:
        raise UserError(f"--ref-views {path}: not a readable tar ({e})") from None
    if found is None:
        raise UserError(
            f"--ref-views {path}: no sample {uid!r}" if uid else f"--ref-views {path}: empty"
        )
    key, m = found
    where = f"--ref-views {path}: sample {key}"
    try:
        sample = MultiViewSample.decode(key, m, strict=False)
    except SampleInvalid as e:
        raise UserError(f"{where}: {e}") from None
    n, meta, c2w = sample.num_views, sample.meta, sample.c2w
    try:
        fov = np.asarray(meta.get("fov_deg"), dtype=np.float32).reshape(-1)  # () | (V,) -> (1|V,)
    except Exception as e:
        raise UserError(f"{where}: bad fov_deg ({e})") from None
    if len(fov) not in (1, n):
        raise UserError(f"{where}: fov_deg must hold 1 or {n} numbers")
    names = [view_member("rgba", v) for v in range(n)]
    imgs = [_read_png(data, f"{where}: {name}") for name, data in zip(names, sample.rgba)]
    _check_views(imgs, c2w, fov, where)
    imgs = [
        i if i.shape[-1] == 4 else np.concatenate([i, np.full_like(i[..., :1], 255)], -1)
        for i in imgs
    ]
    rgba = torch.from_numpy(np.stack(imgs)).float() / 255.0  # (V, H, W, 4)
    rgba = rgba.permute(0, 3, 1, 2)  # (V, H, W, 4) -> (V, 4, H, W)
    return {
        "uid": key,
        "rgba": rgba,
        "c2w": torch.from_numpy(c2w).float(),
        "fov_deg": torch.from_numpy(np.broadcast_to(fov, (n,)).copy()),
        "background": None,
        "has_alpha": True,
    }


def load_sample_folder(path, fov_deg: float = 40.0) -> dict:
    """The views of an ``mvdiff sample`` output folder (``cameras.json`` + per-view PNGs)."""
    path = Path(path)
    cams = path / "cameras.json"
    if not cams.is_file():
        raise UserError(f"--ref-views {path}: no cameras.json (not an `mvdiff sample` folder)")
    try:
        record = json.loads(cams.read_text())
        views = record["views"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise UserError(f"--ref-views {cams}: not a readable cameras.json ({e})") from None
    if not isinstance(views, list) or not all(isinstance(v, dict) for v in views):
        raise UserError(f"--ref-views {cams}: views must be a list of objects")
    imgs, c2ws, fovs = [], [], []
    for view in views:
        where = f"--ref-views {cams}: view {view.get('index')}"
        if view.get("c2w") is None:
            raise UserError(f"{where} has no camera (2D mode)")
        img_path = path / str(view.get("file"))
        if not img_path.is_file():
            raise UserError(f"--ref-views {path}: missing {view.get('file')}")
        imgs.append(_read_png(img_path, f"--ref-views {img_path}"))
        try:
            fov = float(view.get("fov_deg", record.get("fov_deg", fov_deg)))
            c2w = np.asarray(view["c2w"], dtype=np.float64).reshape(4, 4)  # nested list -> (4, 4)
            dist = float(view.get("distance", framing_distance(fov)))
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: bad c2w, fov_deg or distance ({e})") from None
        norm = np.linalg.norm(c2w[:3, 3])
        if not (np.isfinite(c2w).all() and math.isfinite(dist) and dist > 0):
            raise UserError(f"{where}: camera is not finite")
        if norm < 1e-6:
            raise UserError(f"{where} camera at the origin")
        c2w[:3, 3] *= dist / norm
        c2ws.append(c2w)
        fovs.append(fov)
    if not imgs:
        raise UserError(f"--ref-views {cams}: no views")
    _check_views(imgs, np.stack(c2ws), np.asarray(fovs), f"--ref-views {path}")
    has_alpha = all(i.shape[-1] == 4 for i in imgs)
    arr = (
        torch.from_numpy(np.stack([i[..., : 4 if has_alpha else 3] for i in imgs])).float() / 255.0
    )
    arr = arr.permute(0, 3, 1, 2)  # (V, H, W, C) -> (V, C, H, W)
    background = None
    if not has_alpha:
        alpha, background = estimate_alpha(arr)
        arr = torch.cat([arr, alpha], dim=1)  # (V, 3, H, W) -> (V, 4, H, W)
    return {
        "uid": path.name,
        "rgba": arr,
        "c2w": torch.from_numpy(np.stack(c2ws)).float(),
        "fov_deg": torch.tensor(fovs, dtype=torch.float32),
        "background": background,
        "has_alpha": has_alpha,
    }


def load_ref_views(path, uid: str | None = None, fov_deg: float = 40.0) -> dict:
    """A shard sample (``path`` is a .tar) or an ``mvdiff sample`` folder (a directory)."""
    path = Path(path)
    if path.is_dir():
        return load_sample_folder(path, fov_deg)
    return load_shard_sample(path, uid)


def prepare_rays(views: dict, resolution: int, indices=None) -> dict:
    """All rays of the views ``indices`` at ``resolution``: ``o``, ``d`` ``[N, 3]``, target
    ``rgba`` ``[N, 4]`` (area-resized), ``background`` (``[3]`` or None) for ray batches."""
    from mvdiff.sds.render import camera_rays

    idx = torch.arange(views["rgba"].shape[0]) if indices is None else torch.as_tensor(indices)
    rgba = views["rgba"][idx].float()
    if rgba.shape[-1] != resolution or rgba.shape[-2] != resolution:
        rgba = F.interpolate(rgba, size=(resolution, resolution), mode="area")
    o, d = camera_rays(views["c2w"][idx], views["fov_deg"][idx], resolution)
    return {
        "o": o.reshape(-1, 3),  # (V, H, W, 3) -> (N, 3)
        "d": d.reshape(-1, 3),  # (V, H, W, 3) -> (N, 3)
        "rgba": rgba.permute(0, 2, 3, 1).reshape(-1, 4),  # (V, 4, H, W) -> (V, H, W, 4) -> (N, 4)
        "background": views.get("background"),
    }
