"""How well an exported mesh agrees with its field, its reference views and its source mesh.

* :func:`mesh_silhouette_iou`: the mesh's silhouettes (:func:`mvdiff.sds.raster.
  mesh_silhouettes`) against alpha or opacity maps of the same cameras;
* :func:`load_source_mesh`: the asset a shard was rendered from, in the shard's frame (z up,
  normalised to the unit box with the ``normalization`` the renderer stored: ``p_norm =
  scale * p + offset``), read as Blender's importers read it (glTF and OBJ are +Y up, PLY
  and STL +Z up);
* :func:`chamfer_distance`: symmetric mean nearest-neighbour distance between surface
  samples of two meshes, in units of the unit box (the object's largest side is 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mvdiff.errors import UserError
from mvdiff.sds.raster import mesh_silhouettes

__all__ = [
    "chamfer_distance",
    "load_source_mesh",
    "mesh_silhouette_iou",
    "shard_normalization",
]

#: importers that turn a +Y-up file into Blender's +Z-up world (docs/design.md §4)
_Y_UP = {".glb", ".gltf", ".obj"}
_Z_UP = {".ply", ".stl"}


def mesh_silhouette_iou(verts, faces, c2w, fov_deg, masks: torch.Tensor) -> float:
    """IoU of the mesh's silhouettes with ``masks`` ``[V, 1, H, W]`` (alpha or opacity,
    thresholded at 0.5) seen by cameras ``c2w`` ``[V, 4, 4]``, pooled over the views."""
    from mvdiff.sds.recon import silhouette_iou

    sil = mesh_silhouettes(verts, faces, c2w, fov_deg, masks.shape[-1])
    return silhouette_iou(sil, masks.float().cpu())


def shard_normalization(path, uid: str | None = None) -> dict | None:
    """The ``normalization`` ({scale, offset}) a shard stored for sample ``uid`` (or its first
    sample); None for sources that are not shards or lack it."""
    path = Path(path)
    if not path.is_file():
        return None
    from mvdiff.shards import read_metadata

    meta = next(iter(read_metadata(path, uid, first=True).values()), None)
    return (meta or {}).get("normalization")


def load_source_mesh(path, normalization: dict | None = None):
    """(vertices ``[N, 3]``, faces ``[M, 3]``) of an asset file in the render's world frame
    (z up), normalised with ``normalization`` ({scale, offset}) when given."""
    import trimesh

    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UserError(f"--ref-mesh {path}: no such file")
    if suffix not in _Y_UP | _Z_UP:
        raise UserError(f"--ref-mesh {path}: must be .glb, .gltf, .obj, .ply or .stl")
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as e:  # trimesh raises many kinds on broken files
        raise UserError(f"--ref-mesh {path}: not a readable mesh ({e})") from None
    v = np.asarray(mesh.vertices, dtype=np.float64)
    if len(v) == 0 or len(mesh.faces) == 0:
        raise UserError(f"--ref-mesh {path}: no triangles")
    if suffix in _Y_UP:
        v = np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1)  # y up -> z up
    if normalization is not None:
        v = v * float(normalization["scale"]) + np.asarray(normalization["offset"], np.float64)
    return v, np.asarray(mesh.faces, dtype=np.int64)


def _surface_samples(verts, faces, n: int, seed: int) -> np.ndarray:
    import trimesh

    mesh = trimesh.Trimesh(np.asarray(verts, np.float64), np.asarray(faces), process=False)
    pts, _ = trimesh.sample.sample_surface(mesh, n, seed=seed)
    return np.asarray(pts)


def chamfer_distance(a_verts, a_faces, b_verts, b_faces, n: int = 20000, seed: int = 0) -> float:
    """Symmetric Chamfer distance: the mean of the two directed mean nearest-neighbour
    distances between ``n`` area-uniform surface samples of mesh a and of mesh b."""
    from scipy.spatial import cKDTree

    if len(a_faces) == 0 or len(b_faces) == 0:
        return float("inf")
    pa = _surface_samples(a_verts, a_faces, n, seed)
    pb = _surface_samples(b_verts, b_faces, n, seed + 1)
    d_ab, _ = cKDTree(pb).query(pa)
    d_ba, _ = cKDTree(pa).query(pb)
    return float((d_ab.mean() + d_ba.mean()) / 2)
