"""Multi-view metrics of one set of views: 3D consistency and agreement with ground truth.

* :func:`reconstruction_consistency` fits one radiance field to the views at their cameras
  with :func:`mvdiff.sds.recon.reconstruct_from_views` (posed RGB + mask losses, no
  diffusion prior) and reports how well one 3D object explains them: the PSNR of the fit on
  all views and, with held-out views, the PSNR of views the field never saw, and the same
  for the silhouettes (IoU of the field's opacity and the views' alpha). Views of one
  object score high; the same views at the wrong cameras, or views of different objects,
  score low (tests/test_eval.py).
* :func:`match_views` pairs each view with the ground-truth view of (nearly) the same camera
  and :func:`gt_agreement` scores them with PSNR / SSIM.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mvdiff.eval.metrics import psnr, ssim

__all__ = ["gt_agreement", "holdout_sets", "match_views", "reconstruction_consistency"]

Holdout = Literal["none", "one", "all"]


def holdout_sets(num_views: int, holdout: Holdout) -> list[list[int]]:
    """The held-out index sets: none; ``one`` (view 1: with 4 views 90° apart, a side view
    whose neighbours are both fitted); ``all`` (leave-one-out, one fit per view)."""
    if holdout == "none" or num_views < 2:
        return []
    if holdout == "one":
        return [[1]]
    if holdout == "all":
        return [[i] for i in range(num_views)]
    raise ValueError(f"holdout must be none, one or all, got {holdout!r}")


def reconstruction_consistency(
    rgba: torch.Tensor,
    c2w: torch.Tensor,
    fov_deg,
    *,
    steps: int = 150,
    holdout: Holdout = "one",
    resolution: int | None = None,
    seed: int = 0,
    config=None,
    fit_all: bool = True,
) -> dict:
    """How well one radiance field explains ``rgba`` ``[V, 4, H, W]`` (straight alpha, [0, 1])
    seen from ``c2w`` ``[V, 4, 4]`` (OpenGL c2w, docs/design.md §4) with ``fov_deg`` (float or ``[V]``).

    Returns ``psnr`` (fit on all views, PSNR over all of them), ``psnr_holdout`` (mean over
    the held-out fits of the PSNR of the held-out view; None with ``holdout="none"``),
    ``psnr_holdout_views`` (per fit), ``iou`` / ``iou_holdout`` / ``iou_holdout_views`` (the
    same for the silhouettes: IoU of the field's opacity and the views' alpha, both > 0.5;
    the shape alone, which colour and blur leave alone), ``renders`` / ``targets``
    ``[V, 3, H, W]`` of the all-view fit (for the report) and ``seconds``.

    ``fit_all=False`` (with a held-out variant) saves the all-view fit: ``psnr`` and the
    renders then come from the first held-out fit (PSNR over the views it was fitted to).
    """
    from mvdiff.sds.recon import reconstruct_from_views

    kw = dict(steps=steps, resolution=resolution, seed=seed, config=config)
    sets = holdout_sets(rgba.shape[0], holdout)
    full, seconds, held, held_iou = None, 0.0, [], []
    if fit_all or not sets:
        full = reconstruct_from_views(rgba, c2w, fov_deg, **kw)
        seconds += float(full["seconds"])
    for idx in sets:
        r = reconstruct_from_views(rgba, c2w, fov_deg, holdout=idx, **kw)
        held.append(float(r["psnr_holdout"]))
        held_iou.append(float(r["iou_holdout"]))
        seconds += float(r["seconds"])
        full = full or r
    return {
        "psnr": float(full["psnr_train"]),
        "psnr_holdout": sum(held) / len(held) if held else None,
        "psnr_holdout_views": held,
        "iou": float(full["iou_train"]),
        "iou_holdout": sum(held_iou) / len(held_iou) if held_iou else None,
        "iou_holdout_views": held_iou,
        "renders": full["renders"],
        "targets": full["targets"],
        "seconds": round(seconds, 2),
    }


def _view_dirs(c2w: torch.Tensor) -> torch.Tensor:
    """Unit directions ``[V, 3]`` from the origin to the camera centres."""
    return F.normalize(c2w[:, :3, 3].double(), dim=-1)


def match_views(c2w: torch.Tensor, gt_c2w: torch.Tensor) -> tuple[list[int], list[float]]:
    """For each camera of ``c2w`` ``[V, 4, 4]``, the index of the ``gt_c2w`` ``[G, 4, 4]``
    camera seen from the nearest direction (distance and fov are ignored: the model's camera
    has neither), and the angle between the two directions in degrees."""
    cos = _view_dirs(c2w) @ _view_dirs(gt_c2w).t()  # (V, 3) @ (3, G) -> (V, G)
    best = cos.argmax(dim=1)
    angles = torch.rad2deg(torch.arccos(cos.gather(1, best[:, None]).clamp(-1, 1)))  # (V, 1)
    return best.tolist(), angles.reshape(-1).tolist()  # (V, 1) -> (V,)


def gt_agreement(views: torch.Tensor, gt: torch.Tensor) -> dict:
    """PSNR / SSIM of views ``[V, 3, H, W]`` against ground truth ``[V, 3, H', W']`` (both in
    [0, 1], same background); the ground truth is area-resized to ``H x W`` if needed.

    ``psnr`` is over all views together (mean squared error of the set), ``ssim`` the mean
    over views; ``psnr_views`` / ``ssim_views`` are per view."""
    if gt.shape[-2:] != views.shape[-2:]:
        gt = F.interpolate(gt.float(), size=tuple(views.shape[-2:]), mode="area")
    p = psnr(views.float(), gt.float())
    s = ssim(views.float(), gt.float())
    # PSNR of the whole set (from the mean MSE): a mean of per-view PSNRs would let one
    # identical view (PSNR capped at 100 dB) hide three wrong ones.
    flat_views = views.float().reshape(1, -1, *views.shape[-2:])  # (V, 3, H, W) -> (1, V*3, H, W)
    flat_gt = gt.float().reshape(1, -1, *gt.shape[-2:])  # (V, 3, H, W) -> (1, V*3, H, W)
    joint = psnr(flat_views, flat_gt)
    return {
        "psnr": float(joint),
        "ssim": float(s.mean()),
        "psnr_views": [float(x) for x in p],
        "ssim_views": [float(x) for x in s],
    }
