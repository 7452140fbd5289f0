"""The mesh a run hands over, and how well it agrees with what was optimised.

:func:`export_asset` extracts the field's surface (:func:`mvdiff.sds.mesh.extract_mesh`, the
iso-level chosen so that the mesh's silhouettes reproduce the field's rendered opacity at the
reference cameras, or at 16 orbit cameras without reference views; floaters and inner shells
dropped; watertight), decimates it to about ``config.mesh_faces`` faces (quadric error; may
pinch a few edges, 0 keeps the marched mesh), gives it a UV atlas (xatlas) and bakes the field's albedo into a texture (``config.mesh_texture = "uv"``; "vertex"
keeps per-vertex colours), writes ``mesh.glb`` (texture embedded), ``mesh.obj`` +
``mesh.mtl`` + ``mesh_albedo.png`` and ``mesh.ply`` (vertex colours), and measures:

* with reference views: PSNR of the field's renders against them (training views and the
  held-out ``config.ref_holdout``), silhouette IoU of the field's opacity and of the mesh
  against their alpha, and of the mesh against the field's opacity;
* with ``config.ref_mesh`` (the asset the reference shard was rendered from): Chamfer distance
  between the mesh and it, in the shard's normalised frame (:mod:`mvdiff.sds.mesh_eval`);
* seconds per stage.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mvdiff.sds.mesh import (
    bake_texture,
    decimate,
    default_views,
    export_mesh,
    extract_mesh,
    textured_trimesh,
    to_trimesh,
    uv_atlas,
)
from mvdiff.sds.mesh_eval import (
    chamfer_distance,
    load_source_mesh,
    mesh_silhouette_iou,
    shard_normalization,
)

__all__ = ["export_asset"]

log = logging.getLogger(__name__)


def _device(field):
    return next(field.parameters()).device


def _watertight(verts, faces) -> bool:
    import trimesh

    return bool(len(faces)) and trimesh.Trimesh(verts, faces, process=False).is_watertight


def _r(x, nd=4):
    return None if x is None else round(float(x), nd)


@torch.no_grad()
def export_asset(
    field, config, output, ref: dict | None = None, resolution: int | None = None, render=None
):
    """Mesh files of ``field`` into ``output`` and their summary (module docstring).

    ``ref``: the reference views (:func:`mvdiff.sds.ref_views.load_ref_views`) or None;
    ``resolution``: the size they were fitted at; ``render``: how the representation draws
    itself, ``(c2w, fov_deg, resolution, background) -> (rgb [V, 3, H, W], opacity
    [V, 1, H, W])`` (default: volume rendering of ``field``; 3D Gaussians pass their
    rasteriser and a grid ``field``, :class:`mvdiff.sds.gaussian_fit.GaussianGridField`). Returns ``{"mesh": {...}, "metrics":
    {...}, "seconds": {...}}``.
    """
    from mvdiff.sds.recon import psnr, render_views, silhouette_iou
    from mvdiff.sds.ref_views import composite

    output = Path(output)
    seconds, metrics = {}, {}
    t = time.time()
    if ref is not None:
        res = int(resolution or ref["rgba"].shape[-1])
        views = {"c2w": ref["c2w"], "fov_deg": ref["fov_deg"], "resolution": res}
    else:
        c2w, fov = default_views()
        views = {"c2w": c2w, "fov_deg": torch.full((len(c2w),), fov), "resolution": 64}
    c2w, res = views["c2w"], views["resolution"]
    fov = torch.as_tensor(views["fov_deg"], dtype=torch.float32).reshape(-1).expand(len(c2w))
    bg = torch.tensor(config.background.color, dtype=torch.float32)
    if ref is not None and ref.get("background") is not None:  # RGB views: their own colour
        bg = torch.as_tensor(ref["background"], dtype=torch.float32)
    if render is None:
        renders, opacity = render_views(field, c2w, fov, res, config.samples, bg, with_opacity=True)
    else:
        renders, opacity = render(c2w, fov, res, bg)
    seconds["field_render"] = round(time.time() - t, 2)
    t = time.time()
    info = {}
    verts, faces, colors = extract_mesh(
        field, config.mesh_resolution, level=config.mesh_level, views={**views, "opacity": opacity},
        samples=config.samples, min_component=config.mesh_min_component, info=info,
    )  # fmt: skip
    extracted = len(faces)
    watertight = _watertight(verts, faces)
    if config.mesh_faces and len(faces) > config.mesh_faces:
        verts, faces = decimate(verts, faces, config.mesh_faces)
        colors = field(torch.from_numpy(verts).to(_device(field)))[1].float().cpu().numpy()
    seconds["mesh_extract"] = round(time.time() - t, 2)

    t = time.time()
    mesh_info = {
        "vertices": int(len(verts)), "faces": int(len(faces)), "faces_extracted": extracted,
        "watertight_extracted": watertight, "watertight": _watertight(verts, faces), **info,
    }  # fmt: skip
    if config.mesh_texture == "uv" and len(faces):
        size = int(config.texture_size)
        tv, tf, uv = uv_atlas(verts, faces, size)
        texture = bake_texture(field, tv, tf, uv, size)
        mesh = textured_trimesh(tv, tf, uv, texture)
        mesh_info.update(texture="uv", texture_size=size)
    else:
        mesh = to_trimesh(verts, faces, colors)
        mesh_info["texture"] = "vertex"
    # What the files hold (a UV atlas splits vertices along its seams).
    mesh_info["vertices"], mesh_info["faces"] = int(len(mesh.vertices)), int(len(mesh.faces))
    seconds["mesh_texture"] = round(time.time() - t, 2)
    t = time.time()
    for name in ("mesh.glb", "mesh.obj", "mesh.ply"):
        export_mesh(mesh, output / name)
    seconds["mesh_write"] = round(time.time() - t, 2)

    t = time.time()
    metrics["mesh_iou_field"] = _r(mesh_silhouette_iou(verts, faces, c2w, fov, opacity))
    if ref is not None:
        rgba = F.interpolate(ref["rgba"].float(), size=(res, res), mode="area")
        alpha = rgba[:, 3:]  # (V, 4, H, W) -> (V, 1, H, W)
        targets = composite(rgba, bg)
        holdout = sorted(set(config.ref_holdout))
        train = [i for i in range(len(c2w)) if i not in holdout]
        metrics["psnr_train"] = _r(psnr(renders[train], targets[train]), 2)
        metrics["field_iou_ref"] = _r(silhouette_iou(opacity, alpha))
        metrics["mesh_iou_ref"] = _r(mesh_silhouette_iou(verts, faces, c2w, fov, alpha))
        if holdout:
            metrics["psnr_holdout"] = _r(psnr(renders[holdout], targets[holdout]), 2)
            metrics["mesh_iou_ref_holdout"] = _r(
                mesh_silhouette_iou(verts, faces, c2w[holdout], fov[holdout], alpha[holdout])
            )
    if config.ref_mesh:
        norm = shard_normalization(config.ref_views, config.ref_uid) if config.ref_views else None
        if norm is None:
            log.warning("--ref-mesh %s: no shard normalization; compared as is", config.ref_mesh)
        sv, sf = load_source_mesh(config.ref_mesh, norm)
        metrics["chamfer"] = _r(chamfer_distance(verts, faces, sv, sf), 5)
    seconds["metrics"] = round(time.time() - t, 2)
    log.info("mesh %s; metrics %s", mesh_info, metrics)
    return {"mesh": mesh_info, "metrics": metrics, "seconds": seconds}
