"""Mesh export from a density grid: marching tetrahedra in numpy (no extra dependency).

Each grid cube is split into 6 tetrahedra (Kuhn split along the 0-7 diagonal); every
tetrahedron whose corners straddle ``level`` contributes one triangle (1 or 3 corners inside)
or two (2 inside), with vertices interpolated linearly on the crossing edges and shared
between neighbours (one vertex per grid edge), so closed surfaces come out watertight.
Triangles are oriented outwards (counter-clockwise seen from outside).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["extract_mesh", "marching_tetrahedra", "write_obj", "write_ply"]

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


def write_obj(path, verts, faces, colors=None) -> Path:
    """OBJ with optional per-vertex colours (the common ``v x y z r g b`` extension)."""
    path = Path(path)
    lines = []
    for i, p in enumerate(verts):
        c = "" if colors is None else " {:.4f} {:.4f} {:.4f}".format(*colors[i])
        lines.append(f"v {p[0]:.6f} {p[1]:.6f} {p[2]:.6f}{c}")
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_ply(path, verts, faces, colors=None) -> Path:
    """Binary little-endian PLY with optional uchar vertex colours."""
    path = Path(path)
    n, m = len(verts), len(faces)
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property float {a}" for a in "xyz"]
    fields = [("xyz", "<f4", (3,))]
    if colors is not None:
        header += [f"property uchar {a}" for a in ("red", "green", "blue")]
        fields.append(("rgb", "u1", (3,)))
    header += [f"element face {m}", "property list uchar int vertex_indices", "end_header"]
    vdata = np.zeros(n, dtype=fields)
    vdata["xyz"] = verts
    if colors is not None:
        vdata["rgb"] = np.clip(np.asarray(colors) * 255 + 0.5, 0, 255).astype(np.uint8)
    fdata = np.zeros(m, dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    fdata["n"] = 3
    fdata["idx"] = faces
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode())
        f.write(vdata.tobytes())
        f.write(fdata.tobytes())
    return path
