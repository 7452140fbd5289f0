"""Agreement of views with a vocabulary prompt ("a red cube"), measured, not judged by eye.

The quickstart (:mod:`mvdiff.quickstart`) trains a small model on procedural objects in flat
colours on white (:mod:`mvdiff.render.procedural`) and scores what it samples and what
text-to-3D makes against renders of the named object at the same cameras:

* **colour**: a view *shows* a colour when at least ``min_share`` of its foreground pixels
  (pixels at least ``FOREGROUND`` away from white) are closer to that colour than to any other
  colour of the palette, and the foreground covers at least ``min_cover`` of the view;
* **silhouette**: IoU of the foreground with the render's alpha (> 0.5), per view;
* **shape read**: the shape whose renders' silhouettes agree best (mean IoU over the views).

Views are ``[V, 3, H, W]`` in [0, 1] over white; alphas ``[V, 1, H, W]`` in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "FOREGROUND",
    "colour_shares",
    "foreground",
    "on_white",
    "shape_read",
    "shows_colour",
    "silhouette_iou",
]

#: RGB distance (in [0, 1] units) from white above which a pixel is foreground
FOREGROUND = 0.3


def on_white(rgba: torch.Tensor, size: int) -> torch.Tensor:
    """Renders ``[V, 4, H, W]`` -> (RGB over white ``[V, 3, size, size]``, alpha
    ``[V, 1, size, size]``), area-resized."""
    if rgba.shape[-1] != size:
        rgba = F.interpolate(rgba.float(), size=(size, size), mode="area")
    rgb = rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:])
    return rgb, rgba[:, 3:]


def foreground(rgb: torch.Tensor) -> torch.Tensor:
    """``[V, 3, H, W]`` -> boolean ``[V, H, W]``: pixels at least FOREGROUND from white."""
    return (1.0 - rgb.float()).norm(dim=1) > FOREGROUND


def colour_shares(rgb: torch.Tensor, palette: dict[str, tuple]) -> tuple[list[dict], list[float]]:
    """Per view: {colour: share of the foreground pixels closest to it} and the foreground's
    share of the view. ``palette``: {name: (r, g, b) in 0-255}."""
    names = list(palette)
    ref = torch.tensor([palette[n] for n in names], dtype=torch.float32) / 255.0  # (K, 3)
    fg = foreground(rgb)
    shares, cover = [], []
    for v in range(rgb.shape[0]):
        px = rgb[v].float().permute(1, 2, 0)[fg[v]]  # (3, H, W) -> (H, W, 3) -> (N, 3)
        cover.append(float(fg[v].float().mean()))
        if len(px) == 0:
            shares.append({n: 0.0 for n in names})
            continue
        nearest = torch.cdist(px, ref).argmin(dim=1)  # (N, K) -> (N,)
        counts = torch.bincount(nearest, minlength=len(names)).float() / len(px)
        shares.append({n: float(c) for n, c in zip(names, counts)})
    return shares, cover


def shows_colour(rgb: torch.Tensor, colour: str, palette: dict[str, tuple],
                 min_share: float = 0.5, min_cover: float = 0.05) -> list[bool]:  # fmt: skip
    """Per view: does it show ``colour`` (module docstring)?"""
    shares, cover = colour_shares(rgb, palette)
    return [s[colour] >= min_share and c >= min_cover for s, c in zip(shares, cover)]


def silhouette_iou(rgb: torch.Tensor, alpha: torch.Tensor) -> list[float]:
    """Per view: IoU of the foreground of ``rgb`` with ``alpha > 0.5`` (same size)."""
    a = foreground(rgb)
    b = alpha[:, 0] > 0.5
    inter = (a & b).flatten(1).sum(1).float()  # (V, H, W) -> (V,)
    union = (a | b).flatten(1).sum(1).float().clamp(min=1)
    return [float(x) for x in inter / union]


def shape_read(rgb: torch.Tensor, alphas: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """The shape whose alphas (``{shape: [V, 1, H, W]}``, same cameras as ``rgb``) agree best
    with the views' silhouettes; returns (shape, {shape: mean IoU})."""
    scores = {s: sum(silhouette_iou(rgb, a)) / rgb.shape[0] for s, a in alphas.items()}
    return max(scores, key=scores.get), scores
