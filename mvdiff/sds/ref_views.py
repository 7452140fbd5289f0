"""Posed reference views for reconstruction, and their losses.

Two sources (``--ref-views``):

* a multi-view shard in our schema (DESIGN §3): straight-alpha RGBA views, ``cameras.npy``
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

from mvdiff.errors import UserError

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


def _read_png(data_or_path) -> np.ndarray:
    from PIL import Image

    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as im:
        mode = "RGBA" if ("A" in im.getbands() or "transparency" in im.info) else "RGB"
        return np.asarray(im.convert(mode))


def load_shard_sample(path, uid: str | None = None) -> dict:
    """One sample (``uid``, or the first) of a multi-view shard tar (DESIGN §3)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ref-views {path}: no such shard file or sample folder")
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = info.name.rpartition("/")[2].partition(".")
                if uid is None and members and key not in members:
                    break  # the first sample is complete
                if uid is not None and key != uid:
                    continue
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    except tarfile.TarError as e:
        raise UserError(f"--ref-views {path}: not a readable tar ({e})") from None
    if not members:
        raise UserError(
            f"--ref-views {path}: no sample {uid!r}" if uid else f"--ref-views {path}: empty"
        )
    key, m = next(iter(members.items()))
    try:
        meta = json.loads(m["json"])
        c2w = np.load(io.BytesIO(m["cameras.npy"]))
        views = [m[f"rgba.{v:03d}.png"] for v in range(int(meta["num_views"]))]
        fov = np.asarray(meta["fov_deg"], dtype=np.float32).reshape(-1)  # () | (V,) -> (1|V,)
    except (KeyError, ValueError) as e:
        raise UserError(f"--ref-views {path}: sample {key} is incomplete ({e})") from None
    imgs = [_read_png(b) for b in views]
    imgs = [
        i if i.shape[-1] == 4 else np.concatenate([i, np.full_like(i[..., :1], 255)], -1)
        for i in imgs
    ]
    rgba = torch.from_numpy(np.stack(imgs)).float() / 255.0  # (V, H, W, 4)
    rgba = rgba.permute(0, 3, 1, 2)  # (V, H, W, 4) -> (V, 4, H, W)
    v = rgba.shape[0]
    return {
        "uid": key,
        "rgba": rgba,
        "c2w": torch.from_numpy(c2w).float(),
        "fov_deg": torch.from_numpy(np.broadcast_to(fov, (v,)).copy()),
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
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--ref-views {cams}: not a readable cameras.json ({e})") from None
    imgs, c2ws, fovs = [], [], []
    for view in views:
        if view.get("c2w") is None:
            raise UserError(f"--ref-views {cams}: view {view.get('index')} has no camera (2D mode)")
        img_path = path / view["file"]
        if not img_path.is_file():
            raise UserError(f"--ref-views {path}: missing {view['file']}")
        imgs.append(_read_png(img_path))
        fov = float(view.get("fov_deg", record.get("fov_deg", fov_deg)))
        c2w = np.asarray(view["c2w"], dtype=np.float64).reshape(4, 4)  # nested list -> (4, 4)
        dist = view.get("distance", (math.sqrt(3) / 2) / math.sin(math.radians(fov) / 2))
        norm = np.linalg.norm(c2w[:3, 3])
        if norm < 1e-6:
            raise UserError(f"--ref-views {cams}: view {view.get('index')} camera at the origin")
        c2w[:3, 3] *= float(dist) / norm
        c2ws.append(c2w)
        fovs.append(fov)
    if not imgs:
        raise UserError(f"--ref-views {cams}: no views")
    if len({i.shape[:2] for i in imgs}) != 1:
        raise UserError(f"--ref-views {path}: views differ in size")
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
