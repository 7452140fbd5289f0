"""Posed-view reconstruction with no diffusion prior: views + cameras -> a radiance field.

:func:`reconstruct_from_views` runs the same loop as ``mvdiff text-to-3d --ref-views ...
--sds-weight 0`` (:func:`mvdiff.sds.loop.run_steps`) on in-memory views, optionally holding
some out, and reports PSNR of the final renders. Used by the evaluation code (e.g. to score
the 3D consistency of generated views: reconstruct from some, measure the others).
"""

from __future__ import annotations

import copy
import time

import torch

from mvdiff.sds.config import TextTo3DConfig
from mvdiff.sds.loop import make_fit_state, run_steps
from mvdiff.sds.ref_views import composite, posed_view_loss
from mvdiff.sds.render import render

__all__ = [
    "composite",
    "posed_view_loss",
    "psnr",
    "reconstruct_from_views",
    "render_views",
    "silhouette_iou",
]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (over all elements)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else -10.0 * torch.log10(torch.tensor(mse)).item()


def silhouette_iou(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> float:
    """Intersection over union of the masks ``a > threshold`` and ``b > threshold`` (alpha or
    opacity maps of the same shape, pooled over all of them); 1.0 when both are empty."""
    ma, mb = a > threshold, b > threshold
    union = int((ma | mb).sum())
    return 1.0 if union == 0 else int((ma & mb).sum()) / union


@torch.no_grad()
def render_views(
    field, c2w, fov_deg, resolution: int, samples: int, background, with_opacity: bool = False
):
    """Deterministic renders ``[V, 3, H, W]`` over a colour, one view at a time (bounded memory);
    with ``with_opacity`` also the opacity ``[V, 1, H, W]``: ``(rgb, opacity)``."""
    fov = torch.as_tensor(fov_deg, dtype=torch.float32).reshape(-1).expand(c2w.shape[0])  # (V,)
    outs = [
        render(field, c2w[i : i + 1], fov[i : i + 1], resolution, samples, background=background)
        for i in range(c2w.shape[0])
    ]
    rgb = torch.cat([o["rgb"] for o in outs]).cpu()  # V x (1, 3, H, W) -> (V, 3, H, W)
    if not with_opacity:
        return rgb
    return rgb, torch.cat([o["opacity"] for o in outs]).cpu()  # V x (1, 1, H, W) -> (V, 1, H, W)


@torch.no_grad()
def render_fit(fit, c2w, fov_deg, resolution: int, background):
    """Deterministic renders of a fit state (any representation), one view at a time:
    (rgb ``[V, 3, H, W]``, opacity ``[V, 1, H, W]``) on the CPU."""
    fov = torch.as_tensor(fov_deg, dtype=torch.float32).reshape(-1).expand(c2w.shape[0])  # (V,)
    outs = [
        fit.render(c2w[i : i + 1], fov[i : i + 1], resolution, background=background)
        for i in range(c2w.shape[0])
    ]
    rgb = torch.cat([o["rgb"] for o in outs]).cpu()  # V x (1, 3, H, W) -> (V, 3, H, W)
    return rgb, torch.cat([o["opacity"] for o in outs]).cpu()  # V x (1, 1, H, W) -> (V, 1, H, W)


def reconstruct_from_views(
    rgba: torch.Tensor,
    c2w: torch.Tensor,
    fov_deg: float | torch.Tensor,
    *,
    steps: int,
    resolution: int | None = None,
    holdout: list[int] | None = None,
    seed: int = 0,
    config: TextTo3DConfig | None = None,
    progress: bool = False,
) -> dict:
    """Fit a radiance field to posed views (RGB + mask losses, no diffusion prior).

    Args:
        rgba: ``[V, 4, H, W]`` in [0, 1], straight (not premultiplied) alpha. For RGB views
            without alpha pass alpha = 1 with ``config.ref_mask = "none"``, or estimate it with
            :func:`mvdiff.sds.ref_views.estimate_alpha`.
        c2w: ``[V, 4, 4]`` camera-to-world, OpenGL camera frame, z-up world (docs/design.md §4); the
            object should lie in the field's cube ``[-bound, bound]^3`` (bound 0.6: a unit box).
        fov_deg: field of view in degrees, one for all views or ``[V]``.
        steps: optimisation steps (each: ``config.ref_rays`` random rays of the training views).
        resolution: size the views are fitted and rendered at (default: the views' H).
        holdout: view indices left out of the fit and scored separately.
        seed: seeds the field initialisation and all sampling (same inputs -> same result).
        config: a :class:`~mvdiff.sds.config.TextTo3DConfig` (default
            ``TextTo3DConfig.reconstruction()``); ``steps``, ``seed`` and ``sds_weight = 0``
            are set from the arguments on a copy.
        progress: show a tqdm bar.

    With ``config.representation = "gaussians"`` the fit is 3D Gaussians
    (:mod:`mvdiff.sds.gaussian_fit`) with the same losses.

    Returns a dict: ``field`` (the fitted :class:`~mvdiff.sds.field.RadianceField`; None for
    Gaussians), ``fit`` (the fit state: ``fit.gaussians`` for Gaussians),
    ``renders`` ``[V, 3, H, W]`` (final deterministic renders at all cameras over the solid
    ``config.background.color``, on CPU), ``targets`` ``[V, 3, H, W]`` (the views composited
    over the same colour), ``psnr_train`` (renders vs targets of the non-held-out views),
    ``psnr_holdout`` (held-out views, None without ``holdout``), ``iou_train`` /
    ``iou_holdout`` (the same for the silhouettes: :func:`silhouette_iou` of the field's
    opacity and the views' alpha), ``opacity`` ``[V, 1, H, W]``, ``train`` / ``holdout``
    (index lists), ``seconds`` and ``config``.
    """
    if rgba.ndim != 4 or rgba.shape[1] != 4:
        raise ValueError(f"rgba must be [V, 4, H, W], got {tuple(rgba.shape)}")
    v = rgba.shape[0]
    if c2w.shape != (v, 4, 4):
        raise ValueError(f"c2w must be [{v}, 4, 4], got {tuple(c2w.shape)}")
    holdout = sorted({int(i) for i in (holdout or [])})
    if any(not 0 <= i < v for i in holdout):
        raise ValueError(f"holdout indices {holdout} out of range for {v} views")
    train = [i for i in range(v) if i not in holdout]
    if not train:
        raise ValueError("every view is held out: nothing to fit")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    cfg = copy.deepcopy(config) if config is not None else TextTo3DConfig.reconstruction()
    cfg.steps, cfg.seed, cfg.sds_weight = int(steps), int(seed), 0.0
    res = int(resolution or rgba.shape[-2])
    fov = torch.as_tensor(fov_deg, dtype=torch.float32).reshape(-1).expand(v).clone()  # (V,)
    device = rgba.device
    views = {"rgba": rgba.detach().float().cpu(), "c2w": c2w.detach().float().cpu(), "fov_deg": fov}
    t0 = time.time()
    fit = make_fit_state(cfg, device)
    rays = fit.prepare_ref(views, res, train)
    run_steps(fit, cfg, 0, cfg.steps, rays=rays, progress=progress, desc="reconstruct")

    bg = torch.tensor(cfg.background.color, dtype=torch.float32)
    renders, opacity = render_fit(fit, views["c2w"], fov, res, bg)
    target_rgba = torch.nn.functional.interpolate(views["rgba"], size=(res, res), mode="area")
    targets = composite(target_rgba, bg)
    alpha = target_rgba[:, 3:]  # (V, 4, H, W) -> (V, 1, H, W)
    return {
        "field": getattr(fit, "field", None),
        "fit": fit,
        "renders": renders,
        "targets": targets,
        "opacity": opacity,
        "psnr_train": psnr(renders[train], targets[train]),
        "psnr_holdout": psnr(renders[holdout], targets[holdout]) if holdout else None,
        "iou_train": silhouette_iou(opacity[train], alpha[train]),
        "iou_holdout": silhouette_iou(opacity[holdout], alpha[holdout]) if holdout else None,
        "train": train,
        "holdout": holdout,
        "seconds": round(time.time() - t0, 2),
        "config": cfg,
    }
