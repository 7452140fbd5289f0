"""Inputs of the evaluation: generated views (``mvdiff sample`` folders), ground truth
(a multi-view shard sample or a folder of views + ``cameras.json``) and image sets for FID.

Generated views are RGB on a plain background; their alpha is estimated from the background
colour (:func:`mvdiff.sds.ref_views.estimate_alpha`, as ``mvdiff text-to-3d --ref-views``
does). ``cameras.json`` of ``mvdiff sample`` stores cameras on the unit sphere without a
field of view; like ``text-to-3d`` we then assume ``fov_deg`` and put the camera at the
distance at which the unit box fills the frame (the training renders' framing, docs/design.md §6).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch

from mvdiff.errors import UserError
from mvdiff.shards import CAPTION_SUFFIX, iter_tar_members, read_metadata

__all__ = [
    "composite_white",
    "load_ground_truth",
    "load_ground_truths",
    "load_image_set",
    "load_sample",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def composite_white(rgba: torch.Tensor) -> torch.Tensor:
    """Straight-alpha ``[V, 4, H, W]`` over white -> ``[V, 3, H, W]`` (the training background)."""
    a = rgba[:, 3:4]
    return rgba[:, :3] * a + (1.0 - a)


def _reflag(e: UserError, flag: str) -> UserError:
    """The SDS loaders name ``--ref-views``; in ``mvdiff eval`` the flag is another one."""
    return UserError(str(e).replace("--ref-views", flag))


def load_sample(folder, fov_deg: float = 40.0, flag: str = "SAMPLE") -> dict:
    """An ``mvdiff sample`` output folder: ``name``, ``prompt`` (from settings.json, "" if
    absent), ``rgb`` ``[V, 3, H, W]`` and ``rgba`` ``[V, 4, H, W]`` in [0, 1], ``c2w``
    ``[V, 4, 4]``, ``fov_deg`` ``[V]``, ``elevation_deg`` / ``azimuth_deg`` lists, ``path``."""
    from mvdiff.sds.ref_views import load_sample_folder

    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{flag} {path}: not a folder (expected an `mvdiff sample` output)")
    try:
        views = load_sample_folder(path, fov_deg)
    except UserError as e:
        raise _reflag(e, flag) from None
    record = json.loads((path / "cameras.json").read_text())
    prompt = ""
    settings = path / "settings.json"
    if settings.is_file():
        try:
            prompt = str(json.loads(settings.read_text())["settings"].get("prompt", ""))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{flag} {settings}: not a readable settings.json ({e})") from None
    rgba = views["rgba"]
    rgb = composite_white(rgba) if views["has_alpha"] else rgba[:, :3]
    return {
        "name": path.name,
        "path": str(path),
        "prompt": prompt,
        "rgb": rgb,
        "rgba": rgba,
        "c2w": views["c2w"],
        "fov_deg": views["fov_deg"],
        "elevation_deg": [float(v.get("elevation_deg", float("nan"))) for v in record["views"]],
        "azimuth_deg": [float(v.get("azimuth_deg", float("nan"))) for v in record["views"]],
    }


def _shard_captions(path: Path, flag: str) -> dict[str, str]:
    """uid -> caption of every sample of a multi-view shard (reads only the .json members)."""
    try:
        metas = read_metadata(path)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{flag} {path}: not a readable tar ({e})") from None
    return {key: str((meta or {}).get("caption", "")) for key, meta in metas.items()}


def _norm_caption(text: str) -> str:
    text = text.strip().lower()
    return text.removesuffix(CAPTION_SUFFIX)


def load_ground_truths(
    path, uid: str | None = None, prompt: str = "", fov_deg: float = 40.0, flag: str = "--gt"
) -> list[dict]:
    """Candidate ground truths, each ``uid``, ``caption``, ``rgba`` ``[G, 4, H, W]``, ``c2w``
    ``[G, 4, 4]``, ``fov_deg`` ``[G]``.

    ``path`` is a multi-view shard (docs/design.md §3) — the sample ``uid``, else every sample whose
    caption is ``prompt`` (a caption can fit several objects: the evaluation scores against
    the closest), else its only sample — or a folder of views with ``cameras.json`` (the
    layout of ``mvdiff sample``; RGBA PNGs keep their alpha).
    """
    from mvdiff.sds.ref_views import load_sample_folder, load_shard_sample

    path = Path(path)
    try:
        if path.is_dir():
            views = load_sample_folder(path, fov_deg)
            caption = ""
            settings = path / "settings.json"
            if settings.is_file():
                caption = str(
                    json.loads(settings.read_text()).get("settings", {}).get("prompt", "")
                )
            return [{"uid": path.name, "caption": caption, "rgba": views["rgba"],
                     "c2w": views["c2w"], "fov_deg": views["fov_deg"]}]  # fmt: skip
        if not path.is_file():
            raise UserError(f"{flag} {path}: no such shard file or folder")
        captions = _shard_captions(path, flag)
        if not captions:
            raise UserError(f"{flag} {path}: no samples")
        if uid is not None:
            if uid not in captions:
                raise UserError(f"{flag} {path}: no sample {uid!r} (--gt-uid)")
            uids = [uid]
        else:
            uids = [
                k
                for k, c in captions.items()
                if prompt and _norm_caption(c) == _norm_caption(prompt)
            ]
            if not uids and len(captions) == 1:
                uids = list(captions)
            if not uids:
                raise UserError(
                    f"{flag} {path}: {len(captions)} samples and none captioned {prompt!r}; "
                    "name one with --gt-uid"
                )
        out = []
        for u in uids:
            views = load_shard_sample(path, u)
            out.append({"uid": views["uid"], "caption": captions.get(views["uid"], ""),
                        "rgba": views["rgba"], "c2w": views["c2w"],
                        "fov_deg": views["fov_deg"]})  # fmt: skip
        return out
    except UserError as e:
        raise _reflag(e, flag) from None


def load_ground_truth(
    path, uid: str | None = None, prompt: str = "", fov_deg: float = 40.0, flag: str = "--gt"
) -> dict:
    """The first of :func:`load_ground_truths` (one object per call)."""
    return load_ground_truths(path, uid, prompt, fov_deg, flag)[0]


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if "A" in im.getbands():
            rgba = np.asarray(im.convert("RGBA")).astype(np.float32) / 255.0
            a = rgba[..., 3:4]
            return rgba[..., :3] * a + (1.0 - a)  # over white
        return np.asarray(im.convert("RGB")).astype(np.float32) / 255.0


def load_image_set(path, size: int | None = None, flag: str = "--fid-reference") -> torch.Tensor:
    """Every image of a folder (recursively) or a tar (multi-view or 2D shard) as float
    ``[N, 3, S, S]`` in [0, 1] (RGBA over white), resized to ``size`` (default: the first's)."""
    import torch.nn.functional as F

    path = Path(path)
    blobs: list[bytes] = []
    if path.is_dir():
        blobs = [
            p.read_bytes() for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES
        ]
    elif path.is_file():
        try:
            with open(path, "rb") as f:
                for name, data in iter_tar_members(f, str(path)):
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        blobs.append(data)
        except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
            raise UserError(f"{flag} {path}: not a folder or a readable tar ({e})") from None
    else:
        raise UserError(f"{flag} {path}: no such folder or file")
    if not blobs:
        raise UserError(f"{flag} {path}: no images")
    images = []
    for b in blobs:
        x = torch.from_numpy(_decode(b)).permute(2, 0, 1)[None]  # (H, W, 3) -> (1, 3, H, W)
        size = size or int(x.shape[-1])
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="area")
        images.append(x)
    return torch.cat(images)  # N x (1, 3, S, S) -> (N, 3, S, S)
