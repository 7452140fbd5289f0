"""Silhouettes of a triangle mesh from mvdiff cameras (to score exported meshes against the
reference views' alpha with :func:`mvdiff.sds.recon.silhouette_iou`).

Triangles are projected with the camera convention of docs/design.md §4 (OpenGL camera frame, c2w,
``f = (W/2) / tan(fov/2)``) and filled with PIL; a silhouette needs no depth test.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["mesh_silhouettes"]


def mesh_silhouettes(verts, faces, c2w, fov_deg, size: int) -> torch.Tensor:
    """Binary masks ``[V, 1, size, size]`` (float) of the mesh (``verts`` ``[N, 3]`` in the
    z-up world, ``faces`` ``[M, 3]``) seen from ``c2w`` ``[V, 4, 4]`` with ``fov_deg``
    (a float or ``[V]``). Triangles with a corner behind the camera are skipped."""
    from PIL import Image, ImageDraw

    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    c2w = np.asarray(torch.as_tensor(c2w).double().cpu()).reshape(-1, 4, 4)  # (V, 4, 4)
    fovs = np.broadcast_to(np.asarray(fov_deg, dtype=np.float64).reshape(-1), (len(c2w),))
    masks = []
    for k in range(len(c2w)):
        f = (size / 2.0) / math.tan(math.radians(float(fovs[k])) / 2.0)
        p = (verts - c2w[k, :3, 3]) @ c2w[k, :3, :3]  # (N, 3) camera frame
        depth = -p[:, 2]
        d = np.where(depth > 1e-6, depth, 1.0)
        uv = np.stack([size / 2 + f * p[:, 0] / d, size / 2 - f * p[:, 1] / d], -1)  # (N, 2)
        img = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(img)
        front = (depth[faces] > 1e-6).all(1)
        for tri in uv[faces[front]]:  # (3, 2) pixel corners; PIL's pixel centres are at .5
            draw.polygon([(float(x) - 0.5, float(y) - 0.5) for x, y in tri], fill=255)
        masks.append(np.asarray(img, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(masks))[:, None]  # (V, H, W) -> (V, 1, H, W)
