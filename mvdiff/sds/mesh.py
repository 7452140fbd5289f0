"""Mesh export from a density grid: marching tetrahedra in numpy, files written with trimesh.

Each grid cube is split into 6 tetrahedra (Kuhn split along the 0-7 diagonal); every
tetrahedron whose corners straddle ``level`` contributes one triangle (1 or 3 corners inside)
or two (2 inside), with vertices interpolated linearly on the crossing edges and shared
between neighbours (one vertex per grid edge), so closed surfaces come out watertight.
Triangles are oriented outwards (counter-clockwise seen from outside). Only the cubes whose
corners straddle the level are visited.

:func:`extract_mesh` chooses the level from the field itself (:func:`choose_level`: the level
whose mesh silhouettes reproduce the field's rendered opacity), closes the grid at the cube's
faces and drops floaters and inner shells (:func:`keep_main_components`). :func:`uv_atlas`
(xatlas) and :func:`bake_texture` (the field's albedo at each texel's surface point) make a
UV-textured mesh (:func:`textured_trimesh`).

Files (GLB, OBJ + MTL + PNG, PLY; :func:`export_mesh`) carry a texture or per-vertex colours
and use the interchange
convention **+Y up** (glTF's rule, and what Blender's importers expect by default): a world
point ``(x, y, z)`` (z up, docs/design.md §4) is written as ``(x, z, -y)``, so the front of the object
(seen from -y, azimuth 0) faces +Z as glTF viewers expect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mvdiff.io import atomic_write

__all__ = [
    "Z_UP_TO_Y_UP",
    "bake_texture",
    "choose_level",
    "decimate",
    "export_mesh",
    "extract_mesh",
    "keep_main_components",
    "marching_tetrahedra",
    "ray_max_values",
    "textured_trimesh",
    "to_trimesh",
    "uv_atlas",
]

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
    # Only cubes whose corners straddle the level can hold surface (a thin shell of the grid).
    above = v > level
    corners = [above[i : r - 1 + i, j : r - 1 + j, k : r - 1 + k] for i, j, k in _CORNERS]
    some = np.logical_or.reduce(corners)
    every = np.logical_and.reduce(corners)
    base = np.argwhere(some & ~every)  # (C, 3) straddling cubes
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


def _pad_grid(grid: np.ndarray, bound: float, fill: float = 0.0):
    """The grid with one layer of ``fill`` around it and its new half-extent: surfaces that
    reach the cube's faces are closed there (watertight)."""
    r = grid.shape[0]
    h = 2 * bound / (r - 1)
    return np.pad(grid, 1, constant_values=fill), bound + h


def ray_max_values(grid: torch.Tensor, bound: float, o: torch.Tensor, d: torch.Tensor, chunk=4096):
    """Largest trilinear value of ``grid`` ``[R, R, R]`` (indexed [ix, iy, iz] over
    [-bound, bound]^3) along each ray ``o``, ``d`` ``[N, 3]``, sampled every cell: the ray
    meets the iso-surface of level L of that grid (about) iff its value is above L."""
    from mvdiff.sds.render import ray_box

    r = grid.shape[0]
    n_samples = int(np.ceil(np.sqrt(3) * (r - 1))) + 1  # one-cell steps across the diagonal
    vol = grid.float()[None, None]  # (R, R, R) -> (1, 1, D=ix, H=iy, W=iz)
    out = []
    for oc, dc in zip(o.split(chunk), d.split(chunk)):
        near, far, hit = ray_box(oc, dc, bound)
        s = torch.linspace(0.0, 1.0, n_samples)
        t = near[:, None] + (far - near)[:, None] * s[None]  # (N, S)
        pts = oc[:, None] + dc[:, None] * t[..., None]  # (N, S, 3)
        # grid_sample's coordinates are (W, H, D) = (iz, iy, ix): reverse the axes.
        g = (pts[..., [2, 1, 0]] / bound).reshape(1, -1, 1, 1, 3)  # (N, S, 3) -> (1, N*S, 1, 1, 3)
        val = torch.nn.functional.grid_sample(vol, g, align_corners=True, padding_mode="zeros")
        val = val.reshape(oc.shape[0], n_samples).amax(1)  # (1, 1, N*S, 1, 1) -> (N, S) -> (N,)
        out.append(torch.where(hit, val, torch.zeros_like(val)))
    return torch.cat(out)


def choose_level(max_values: torch.Tensor, opacity: torch.Tensor, candidates: int = 64):
    """The iso-level whose silhouettes best reproduce the field's rendered opacity.

    ``max_values`` ``[N]``: per ray, the largest grid value along it (:func:`ray_max_values`);
    ``opacity`` ``[N]``: the field's rendered opacity of the same rays. A mesh at level L covers
    exactly the rays with ``max_values > L``; the level maximising the intersection over union
    with ``opacity > 0.5`` is returned with that IoU: ``(level, iou)``.
    """
    target = opacity.reshape(-1) > 0.5
    mv = max_values.reshape(-1).double()
    pos = mv[mv > 0]
    if pos.numel() == 0 or not bool(target.any()):
        return float("nan"), 0.0
    # Geometric candidates between the smallest and largest values along rays.
    lo = float(torch.quantile(pos, 0.01)) if pos.numel() > 1 else float(pos[0]) / 2
    hi = float(pos.max())
    levels = np.geomspace(max(lo, hi * 1e-6), hi, candidates + 1)[:-1]
    best = (float(levels[0]), -1.0)
    for lv in levels:
        covered = mv > lv
        iou = float((covered & target).sum()) / float((covered | target).sum())
        if iou > best[1]:
            best = (float(lv), iou)
    return best


def keep_main_components(verts, faces, min_fraction: float = 0.05):
    """Drop floaters and inner shells: split the mesh into connected pieces and keep those that
    enclose a positive volume (outward-facing) of at least ``min_fraction`` of the largest's.
    Returns (vertices, faces, number of pieces kept, number dropped)."""
    import trimesh

    if len(faces) == 0:
        return verts, faces, 0, 0
    mesh = trimesh.Trimesh(np.asarray(verts, np.float64), np.asarray(faces), process=False)
    parts = mesh.split(only_watertight=False)
    vols = np.array([p.volume for p in parts])  # signed: negative for inward-facing shells
    keep = [p for p, v in zip(parts, vols) if v > 0 and v >= min_fraction * vols.max()]
    if not keep:
        keep = [parts[int(np.argmax([p.area for p in parts]))]]
    out = trimesh.util.concatenate(keep) if len(keep) > 1 else keep[0]
    return (
        np.asarray(out.vertices, np.float32),
        np.asarray(out.faces, np.int64),
        len(keep),
        len(parts) - len(keep),
    )


def decimate(verts, faces, target_faces: int):
    """Quadric-error decimation (trimesh with fast-simplification) to about ``target_faces``
    faces; meshes with fewer are returned unchanged. Keeps the shape to well under a grid cell
    and makes UV atlases (xatlas) several times faster; may pinch a few edges (non-manifold)."""
    import trimesh

    if target_faces <= 0 or len(faces) <= target_faces:
        return verts, faces
    mesh = trimesh.Trimesh(np.asarray(verts, np.float64), np.asarray(faces), process=False)
    out = mesh.simplify_quadric_decimation(face_count=int(target_faces))
    return np.asarray(out.vertices, np.float32), np.asarray(out.faces, np.int64)


def default_views(fov_deg: float = 40.0):
    """Cameras to fit the iso-level at when a run has no reference views: 8 azimuths at
    elevations 0 and 30 degrees, framing the unit box (c2w ``[16, 4, 4]``, fov)."""
    from mvdiff.cameras import framing_distance, orbit_c2w

    dist = framing_distance(fov_deg)
    el = np.repeat([0.0, 30.0], 8)
    az = np.tile(np.arange(8) * 45.0 + 22.5, 2)
    return torch.from_numpy(orbit_c2w(el, az, dist)).float(), fov_deg


@torch.no_grad()
def extract_mesh(
    field,
    resolution: int = 64,
    level: float | None = None,
    views: dict | None = None,
    samples: int = 64,
    min_component: float = 0.05,
    info: dict | None = None,
):
    """(vertices, faces, vertex colours ``[N, 3]`` in [0, 1]) of a radiance field's surface.

    ``level`` (a density) defaults to the one chosen from the field itself
    (:func:`choose_level`): the field is rendered at ``views`` (``c2w`` ``[V, 4, 4]``,
    ``fov_deg`` float or ``[V]``, ``resolution`` of the images, at most 64² used; default: 16
    orbit cameras at 64², :func:`default_views`; or their ``opacity`` ``[V, 1, H, W]`` if
    rendered already) and the level whose mesh covers the same pixels as the rendered opacity
    (> 0.5) is taken. The grid is closed at the cube's faces, and pieces
    smaller than ``min_component`` of the largest (by volume) and inner shells are dropped
    (:func:`keep_main_components`; 0 keeps every piece). ``info`` (a dict) receives
    ``level``, ``level_iou`` (the silhouette agreement the level was chosen for),
    ``components`` and ``dropped_components``.
    """
    from mvdiff.sds.render import camera_rays, render

    bound = float(field.bound)
    grid = field.density_grid(resolution).cpu()
    info = {} if info is None else info
    if level is None:
        if views is None:
            c2w, fov = default_views()
            views = {"c2w": c2w, "fov_deg": fov, "resolution": 64}
        c2w = torch.as_tensor(views["c2w"]).float()
        fov = torch.as_tensor(views["fov_deg"], dtype=torch.float32).reshape(-1).expand(len(c2w))
        if views.get("opacity") is not None:  # rendered already (e.g. for the metrics)
            opac = torch.as_tensor(views["opacity"]).float().cpu()  # (V, 1, H, W)
            res = opac.shape[-1]
        else:
            res = min(int(views.get("resolution", 64)), 64)  # enough pixels to fit one number
            opac = torch.cat([  # one view at a time (bounded memory)
                render(field, c2w[i : i + 1], fov[i : i + 1], res, samples)["opacity"].cpu()
                for i in range(len(c2w))
            ])  # fmt: skip  # V x (1, 1, H, W) -> (V, 1, H, W)
        o, d = camera_rays(c2w, fov, res)
        mv = ray_max_values(grid, bound, o.reshape(-1, 3), d.reshape(-1, 3))  # (V*H*W,)
        level, iou = choose_level(mv, opac.reshape(-1))  # (V, 1, H, W) -> (V*H*W,)
        info["level_iou"] = round(iou, 4)
        if not np.isfinite(level):  # an empty field: fall back to a 50%-opaque grid cell
            level = float(np.log(2.0) / (2 * bound / (resolution - 1)))
    info["level"] = float(level)
    padded, pbound = _pad_grid(grid.numpy(), bound)
    verts, faces = marching_tetrahedra(padded, level, pbound)
    n_kept, n_dropped = (1 if len(faces) else 0), 0
    if min_component > 0 and len(faces):
        verts, faces, n_kept, n_dropped = keep_main_components(verts, faces, min_component)
    info["components"], info["dropped_components"] = n_kept, n_dropped
    colors = np.zeros_like(verts)
    if len(verts):
        dev = next(field.parameters()).device
        _, c = field(torch.from_numpy(verts).to(dev))
        colors = c.float().cpu().numpy()
    return verts, faces, colors


def uv_atlas(verts, faces, size: int = 1024, padding: int = 2):
    """A UV atlas of the mesh (xatlas) packed into one ``size`` x ``size`` image.

    Returns (vertices ``[N', 3]``, faces ``[M, 3]``, uv ``[N', 2]`` in [0, 1] with the origin
    at the image's bottom-left (the OBJ / trimesh convention; glTF export flips v)): vertices on
    chart seams are duplicated, faces are kept in order.
    """
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(verts, np.float32), np.ascontiguousarray(faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding, pack.bilinear = int(size), int(padding), True
    atlas.generate(pack_options=pack)
    vmap, idx, uv = atlas[0]
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas made {atlas.atlas_count} atlases of {size}² (want one)")
    return np.asarray(verts)[vmap], idx.astype(np.int64), uv.astype(np.float32)


@torch.no_grad()
def bake_texture(field, verts, faces, uv, size: int = 1024, fill_iters: int = 8, chunk=65536):
    """Albedo texture ``[size, size, 3]`` uint8: each texel covered by a triangle in UV space
    gets the field's colour at the surface point it maps to (barycentric interpolation of the
    triangle's corners); texels next to charts take their neighbours' mean for
    ``fill_iters`` rings (no dark seams under bilinear filtering), the rest the mean colour."""
    import torch.nn.functional as F

    from mvdiff.sds.raster import rasterize

    pix = np.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], -1)  # (N, 2) x right, y down
    tri_id, bary = rasterize(torch.from_numpy(pix), torch.from_numpy(faces), size, size)
    tri_id, bary = tri_id.reshape(-1), bary.reshape(-1, 3)  # (S, S) -> (S*S,), (S*S, 3)
    covered = (tri_id >= 0).nonzero().squeeze(1)
    corners = torch.from_numpy(np.asarray(verts, np.float32))[torch.from_numpy(faces)]  # (M, 3, 3)
    pts = (bary[covered, :, None] * corners[tri_id[covered]]).sum(1)  # (K, 3, 3) -> (K, 3)
    dev = next(field.parameters()).device
    cols = torch.cat([field(p.to(dev))[1].float().cpu() for p in pts.split(chunk)])  # (K, 3)
    img = torch.zeros(size * size, 3)
    img[covered] = cols
    mask = torch.zeros(size * size, 1)
    mask[covered] = 1.0
    img = img.reshape(size, size, 3).permute(2, 0, 1)[None]  # (S*S, 3) -> (1, 3, S, S)
    mask = mask.reshape(1, 1, size, size)  # (S*S, 1) -> (1, 1, S, S)
    for _ in range(fill_iters):
        s_img = F.avg_pool2d(img * mask, 3, 1, 1)
        s_mask = F.avg_pool2d(mask, 3, 1, 1)
        grow = (mask == 0) & (s_mask > 0)
        img = torch.where(grow, s_img / s_mask.clamp(min=1e-8), img)
        mask = torch.where(grow, torch.ones_like(mask), mask)
    mean = cols.mean(0) if len(cols) else torch.full((3,), 0.5)
    img = torch.where(mask > 0, img, mean[None, :, None, None])
    arr = img[0].permute(1, 2, 0).clamp(0, 1).numpy()  # (1, 3, S, S) -> (S, S, 3)
    return (arr * 255 + 0.5).astype(np.uint8)


def textured_trimesh(verts, faces, uv, texture: np.ndarray, y_up: bool = True,
                     name: str = "mesh_albedo"):  # fmt: skip
    """A ``trimesh.Trimesh`` with a UV texture (a PBR material ``name`` whose base colour is
    the image; an OBJ's texture file is ``NAME.png``) from world-frame arrays."""
    import trimesh
    from PIL import Image

    v = np.asarray(verts, dtype=np.float64)
    if y_up:
        v = v @ Z_UP_TO_Y_UP.T  # (N, 3) -> (N, 3)
    image = Image.fromarray(np.asarray(texture, np.uint8))
    material = trimesh.visual.material.PBRMaterial(
        name=name, baseColorTexture=image, baseColorFactor=[255, 255, 255, 255],
        metallicFactor=0.0, roughnessFactor=1.0,
    )  # fmt: skip
    visual = trimesh.visual.TextureVisuals(uv=np.asarray(uv, np.float64), material=material)
    return trimesh.Trimesh(v, np.asarray(faces, dtype=np.int64), visual=visual, process=False)


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
    """Write ``mesh`` (a trimesh) to ``path``; the format from the suffix (.glb, .obj, .ply).
    A textured mesh's OBJ comes with its ``.mtl`` and texture PNG beside it (named in the
    OBJ, written first); a GLB embeds the texture. Every file is written under a temporary
    name and renamed. Returns ``path``."""
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("glb", "obj", "ply"):
        raise ValueError(f"{path}: mesh format must be .glb, .obj or .ply")
    files: dict[str, bytes] = {}
    if kind == "obj" and getattr(mesh.visual, "kind", None) == "texture":
        from trimesh.exchange.obj import export_obj

        mtl = path.with_suffix(".mtl").name
        text, files = export_obj(mesh, include_normals=False, return_texture=True, mtl_name=mtl)
        data = text.encode()
    elif kind == "ply" and getattr(mesh.visual, "kind", None) == "texture":
        data = mesh.copy(include_cache=False)
        data.visual = data.visual.to_color()  # PLY: colours per vertex sampled from the texture
        data = data.export(file_type="ply")
    else:
        data = mesh.export(file_type=kind)
    for name, blob in files.items():  # side files first: the OBJ names them
        atomic_write(path.with_name(name), lambda p, b=blob: p.write_bytes(b))
    raw = data if isinstance(data, bytes) else data.encode()
    return atomic_write(path, lambda p: p.write_bytes(raw))
