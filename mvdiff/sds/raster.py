"""A small triangle rasteriser in PyTorch (no z-buffer): which triangle covers each pixel.

Used for mesh silhouettes (the union of the projected triangles, so depth order does not
matter) and for texture baking in UV space (atlas charts do not overlap). Each triangle is
tested against the pixel centres of its bounding box; triangles are processed in buckets of
similar box size so that small triangles (the common case for marched meshes) cost a few
pixel tests each.

Pixel ``(row i, column j)`` has its centre at ``(x, y) = (j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

import numpy as np
import torch

from mvdiff.cameras import intrinsics_from_fov

__all__ = ["mesh_silhouettes", "project_points", "rasterize"]


def _edge(p, q, cx, cy):
    """Twice the signed area of (p, q, pixel centre): ``p``, ``q`` ``[P, 2]``, centres ``[P, K]``."""
    return (q[:, 0:1] - p[:, 0:1]) * (cy - p[:, 1:2]) - (q[:, 1:2] - p[:, 1:2]) * (cx - p[:, 0:1])


def rasterize(points: torch.Tensor, faces: torch.Tensor, height: int, width: int, chunk=65536):
    """Cover ``[H, W]`` with the 2D triangles ``points[faces]`` (pixel units, x right, y down).

    Returns (triangle id ``[H, W]`` long, -1 where no triangle covers the pixel centre;
    barycentric weights ``[H, W, 3]`` of that triangle's corners). Where several triangles
    cover a pixel, one of them wins (use it for silhouettes and non-overlapping atlases).
    """
    pts = points.double()
    faces = faces.long()
    tri_id = torch.full((height * width,), -1, dtype=torch.long)
    bary = torch.zeros(height * width, 3, dtype=torch.float64)
    if faces.numel() == 0:
        return tri_id.reshape(height, width), bary.reshape(height, width, 3).float()
    tri = pts[faces]  # (F, 3, 2)
    lo = torch.ceil(tri.amin(1) - 0.5).long()  # (F, 2) first pixel index whose centre may be in
    hi = torch.floor(tri.amax(1) - 0.5).long()  # (F, 2) last one
    lo[:, 0].clamp_(min=0)
    lo[:, 1].clamp_(min=0)
    hi[:, 0].clamp_(max=width - 1)
    hi[:, 1].clamp_(max=height - 1)
    span = (hi - lo + 1).clamp(min=0)  # (F, 2)
    size = span.amax(1)  # (F,)
    valid = (span.amin(1) > 0).nonzero().squeeze(1)
    # Buckets of box sizes 1, 2, 4, 8, ...: a triangle is tested on a size x size pixel block.
    bucket = torch.ceil(torch.log2(size[valid].double().clamp(min=1))).long()
    for b in bucket.unique().tolist():
        s = 1 << b
        ids = valid[bucket == b]
        step = max(1, chunk // (s * s))
        off = torch.stack(
            torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij"), -1
        ).reshape(-1, 2)  # (s, s, 2) -> (s*s, 2) as (dy, dx)
        for part in ids.split(step):
            t = tri[part]  # (P, 3, 2)
            px = lo[part, 0:1] + off[None, :, 1]  # (P, s*s) columns
            py = lo[part, 1:2] + off[None, :, 0]  # (P, s*s) rows
            inside_box = (px <= hi[part, 0:1]) & (py <= hi[part, 1:2])
            cx, cy = px.double() + 0.5, py.double() + 0.5
            a, bb, c = t[:, 0], t[:, 1], t[:, 2]  # (P, 2) each
            area = (bb[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (bb[:, 1] - a[:, 1]) * (
                c[:, 0] - a[:, 0]
            )  # (P,) twice the signed area

            w0, w1, w2 = (_edge(p, q, cx, cy) for p, q in ((bb, c), (c, a), (a, bb)))
            sign = torch.sign(area)[:, None]
            ok = inside_box & (area.abs()[:, None] > 1e-12)
            ok &= (w0 * sign >= 0) & (w1 * sign >= 0) & (w2 * sign >= 0)
            hit = ok.nonzero()  # (K, 2): (triangle in part, pixel in block)
            if len(hit) == 0:
                continue
            k, p = hit[:, 0], hit[:, 1]
            pix = py[k, p] * width + px[k, p]
            denom = area[k][:, None]
            w = torch.stack([w0[k, p], w1[k, p], w2[k, p]], -1) / denom  # (K, 3)
            tri_id[pix] = part[k]
            bary[pix] = w
    return tri_id.reshape(height, width), bary.reshape(height, width, 3).float()


def project_points(points: torch.Tensor, c2w: torch.Tensor, fov_deg: float, res: int):
    """World points ``[N, 3]`` -> (pixel coordinates ``[N, 2]`` (x right, y down), camera-space
    depth ``[N]``) of an OpenGL camera (looks down -z, +y up; docs/design.md §4)."""
    w2c = torch.linalg.inv(c2w.double())
    cam = points.double() @ w2c[:3, :3].T + w2c[:3, 3]  # (N, 3) camera frame
    k = intrinsics_from_fov(float(fov_deg), res)
    z = (-cam[:, 2]).clamp(min=1e-6)
    u = k[0, 2] + k[0, 0] * cam[:, 0] / z
    v = k[1, 2] - k[1, 1] * cam[:, 1] / z  # image rows grow downwards
    return torch.stack([u, v], -1), -cam[:, 2]


def mesh_silhouettes(verts, faces, c2w, fov_deg, res: int) -> torch.Tensor:
    """Binary silhouettes ``[V, 1, res, res]`` (float 0/1) of a mesh (world frame, z up) seen
    by cameras ``c2w`` ``[V, 4, 4]`` with field of view ``fov_deg`` (float or ``[V]``)."""
    v = torch.as_tensor(np.asarray(verts), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(faces), dtype=torch.long).reshape(-1, 3)
    c2w = torch.as_tensor(c2w).reshape(-1, 4, 4)  # (V, 4, 4)
    fov = torch.as_tensor(fov_deg, dtype=torch.float64).reshape(-1).expand(c2w.shape[0])  # (V,)
    out = []
    for i in range(c2w.shape[0]):
        uv, depth = project_points(v, c2w[i], float(fov[i]), res)
        front = f[(depth[f] > 1e-6).all(1)]  # triangles wholly in front of the camera
        tri_id, _ = rasterize(uv, front, res, res)
        out.append((tri_id >= 0).float()[None])  # (H, W) -> (1, H, W)
    return torch.stack(out) if out else torch.zeros(0, 1, res, res)  # (V, 1, H, W)
