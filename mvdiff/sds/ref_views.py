"""Posed reference views for reconstruction: one object from a multi-view shard (DESIGN §3)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch

from mvdiff.errors import UserError

__all__ = ["load_ref_views"]


def load_ref_views(path, uid: str | None = None) -> dict:
    """``rgba`` ``[V, 4, H, W]`` float in [0, 1] (straight alpha), ``c2w`` ``[V, 4, 4]``,
    ``fov_deg`` ``[V]`` and ``uid`` of one sample (``uid``, or the first) of a shard tar."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ref-views {path}: no such shard file")
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
        fov = np.asarray(meta["fov_deg"], dtype=np.float32)
    except (KeyError, ValueError) as e:
        raise UserError(f"--ref-views {path}: sample {key} is incomplete ({e})") from None
    imgs = [np.asarray(Image.open(io.BytesIO(b)).convert("RGBA")) for b in views]
    rgba = torch.from_numpy(np.stack(imgs)).float() / 255.0  # (V, H, W, 4)
    rgba = rgba.permute(0, 3, 1, 2)  # (V, H, W, 4) -> (V, 4, H, W)
    return {
        "uid": key,
        "rgba": rgba,
        "c2w": torch.from_numpy(c2w).float(),
        "fov_deg": torch.from_numpy(fov),
    }
