"""Mesh export from a density grid: marching tetrahedra in numpy, files written with trimesh.

Each grid cube is split into 6 tetrahedra (Kuhn split along the 0-7 diagonal); every
tetrahedron whose corners straddle ``level`` contributes one triangle (1 or 3 corners inside)
or two (2 inside), with vertices interpolated linearly on the crossing edges and shared
between neighbours (one vertex per grid edge), so closed surfaces come out watertight.
Triangles are oriented outwards (counter-clockwise seen from outside).

Files (GLB, OBJ, PLY; :func:`export_mesh`) carry per-vertex colours and use the interchange
convention **+Y up** (glTF's rule, and what Blender's importers expect by default): a world
point ``(x, y, z)`` (z up, DESIGN §4) is written as ``(x, z, -y)``, so the front of the object
(seen from -y, azimuth 0) faces +Z as glTF viewers expect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mvdiff.io import atomic_write

__all__ = ["Z_UP_TO_Y_UP", "export_mesh", "extract_mesh", "marching_tetrahedra", "to_trimesh"]

_CORNERS = np.array([[(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)])
# Kuhn split: the path 0 -> e_a -> e_a + e_b -> 7 for every permutation (a, b, c) of axes.
_TETS = np.array(
    [
        [0, 1 << a, (1 << a) | (1 << b), 7]
        for a, b in [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    ]
)


def marching_tetrahedra(values: np.ndarray, level: float, bound: float = 1.0):
    """Iso-surface of ``values`` ``[R, R, R]`` (indexed [ix, iy, iz] over [-bound, bound]^3)
    where ``values > level`` is inside. Returns (vertices ``[N, 3]`` float32, faces ``[M, 3]``)."""
    v = np.asarray(values, dtype=np.float64)
    r = v.shape[0]
    flat = v.reshape(-1)  # (R, R, R) -> (R^3,)
    base = np.stack(np.meshgrid(*[np.arange(r - 1)] * 3, indexing="ij"), -1)
    base = base.reshape(-1, 3)  # (R-1, R-1, R-1, 3) -> (C, 3), C cubes
    corner_ids = base[:, None, :] + _CORNERS[None]  # (C, 8, 3)
    gid = (corner_ids[..., 0] * r + corner_ids[..., 1]) * r + corner_ids[..., 2]  # (C, 8)
    tets = gid[:, _TETS].reshape(-1, 4)  # (C, 6, 4) -> (C*6, 4)
    inside = flat[tets] > level
    n_in = inside.sum(1)
    keep = (n_in > 0) & (n_in < 4)
    tets, inside, n_in = tets[keep], inside[keep], n_in[keep]
    if len(tets) == 0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    order = np.argsort(~inside, axis=1, kind="stable")  # inside corners first
    p = np.take_along_axis(tets, order, 1)  # (T, 4) global ids, inside first

    edges, tri_tets = [], []
    for k, pairs in (
        (1, [[(0, 1), (0, 2), (0, 3)]]),
        (3, [[(3, 0), (3, 1), (3, 2)]]),
        (2, [[(0, 2), (0, 3), (1, 3)], [(0, 2), (1, 3), (1, 2)]]),
    ):
        sel = np.nonzero(n_in == k)[0]
        for tri in pairs:
            e = np.stack([np.stack([p[sel, a], p[sel, b]], -1) for a, b in tri], 1)  # (S, 3, 2)
            edges.append(e)
            tri_tets.append(sel)
    edges = np.concatenate(edges)  # (M, 3, 2) global-id pairs
    tri_tets = np.concatenate(tri_tets)  # (M,)

    lo, hi = edges.min(-1), edges.max(-1)
    keys = lo.astype(np.int64) * (r**3) + hi
    uniq, faces = np.unique(keys.reshape(-1), return_inverse=True)  # (M*3,) -> (N,), (M*3,)
    faces = faces.reshape(-1, 3)  # (M*3,) -> (M, 3)
    a, b = uniq // (r**3), uniq % (r**3)
    va, vb = flat[a], flat[b]
    t = np.clip((level - va) / np.where(va == vb, 1e-12, vb - va), 0.0, 1.0)[:, None]
    pa = np.stack(np.unravel_index(a, v.shape), -1).astype(np.float64)
    pb = np.stack(np.unravel_index(b, v.shape), -1).astype(np.float64)
    verts = (pa + t * (pb - pa)) / (r - 1) * (2 * bound) - bound

    # Orient outwards: the normal must point from the inside corners to the outside ones.
    pos = np.stack(np.unravel_index(p[tri_tets], v.shape), -1).astype(np.float64)  # (M, 4, 3)
    ins = inside[tri_tets].copy()
    ins.sort(axis=1)
    ins = ins[:, ::-1]  # matches p's inside-first order
    w = ins[..., None]
    out_dir = (pos * ~w).sum(1) / (~w).sum(1) - (pos * w).sum(1) / w.sum(1)
    tri = verts[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    flip = (normal * out_dir).sum(1) < 0
    faces[flip] = faces[flip][:, ::-1]
    return verts.astype(np.float32), faces.astype(np.int64)


@torch.no_grad()
def extract_mesh(field, resolution: int = 64, level: float | None = None):
    """(vertices, faces, vertex colours ``[N, 3]`` in [0, 1]) of a radiance field's surface.

    ``level`` defaults to the density at which a sample spacing of the grid is 50% opaque.
    """
    bound = float(field.bound)
    grid = field.density_grid(resolution).cpu().numpy()
    if level is None:
        level = float(np.log(2.0) / (2 * bound / (resolution - 1)))
    verts, faces = marching_tetrahedra(grid, level, bound)
    colors = np.zeros_like(verts)
    if len(verts):
        dev = next(field.parameters()).device
        _, c = field(torch.from_numpy(verts).to(dev))
        colors = c.float().cpu().numpy()
    return verts, faces, colors


#: world (z up) -> file (y up): (x, y, z) -> (x, z, -y); a rotation, so winding is kept
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def to_trimesh(verts, faces, colors=None, y_up: bool = True):
    """A ``trimesh.Trimesh`` (vertex colours as uint8 RGBA) from world-frame arrays."""
    import trimesh

    v = np.asarray(verts, dtype=np.float64)
    if y_up:
        v = v @ Z_UP_TO_Y_UP.T  # (N, 3) -> (N, 3)
    vc = None
    if colors is not None:
        vc = np.clip(np.asarray(colors, dtype=np.float64) * 255 + 0.5, 0, 255).astype(np.uint8)
    return trimesh.Trimesh(v, np.asarray(faces, dtype=np.int64), vertex_colors=vc, process=False)


def export_mesh(mesh, path) -> Path:
    """Write ``mesh`` (a trimesh) to ``path``; the format from the suffix (.glb, .obj, .ply);
    written under a temporary name and renamed."""
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("glb", "obj", "ply"):
        raise ValueError(f"{path}: mesh format must be .glb, .obj or .ply")
    data = mesh.export(file_type=kind)
    return atomic_write(
        path, lambda p: p.write_bytes(data if isinstance(data, bytes) else data.encode())
    )
