"""A differentiable triangle-mesh renderer in PyTorch (the refinement stage's rasteriser).

Per view:

1. **Visibility** (no gradient): every triangle is tested against the pixel centres of its
   bounding box (in buckets of similar box size, as :func:`mvdiff.sds.raster.rasterize`), the
   camera depth of each covering triangle is interpolated perspective-correctly and the
   nearest one wins (a z-buffer). With ``backend="nvdiffrast"`` (CUDA, when installed) this
   pass is ``nvdiffrast.torch.rasterize``; everything after it is the same code.
2. **Interpolation** (differentiable): the winning triangle's barycentric weights are
   recomputed from the projected vertices (perspective-correct), so attributes (UV, and the
   pixel's surface point) carry gradients to the vertex positions and the texture.
3. **Soft silhouette** (differentiable, a band around the silhouette only): each triangle
   near a pixel covers it with probability ``sigmoid(d / sigma)`` (``d``: the pixel's signed
   distance to the triangle in pixels, > 0 inside) and the pixel's opacity is ``1 - prod(1 -
   p)``, SoftRas-style. With ``sigma`` half a pixel this is an antialiased edge (a pixel whose
   centre lies half a pixel inside a straight edge is 73% covered, the mirrored pixel outside
   27%), and silhouettes pull vertices towards the target's alpha. Away from the band the
   opacity is the hard coverage (0 or 1). Band pixels outside the hard coverage take the
   colour of their most covering triangle (barycentric weights clamped to its edges).

Cameras follow docs/design.md §4 (z-up world, OpenGL camera frame, square images with
``f = (W/2) / tan(fov/2)``); pixel ``(row i, column j)`` has its centre at ``(j + 0.5,
i + 0.5)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["BACKENDS", "nvdiffrast_available", "project", "rasterize_views", "render_mesh"]

BACKENDS = ("auto", "torch", "nvdiffrast")


def nvdiffrast_available(device) -> bool:
    """Whether the nvdiffrast visibility pass can run on ``device`` (CUDA and installed)."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import nvdiffrast.torch  # noqa: F401
    except ImportError:
        return False
    return True


def project(verts: torch.Tensor, c2w: torch.Tensor, fov_deg: float, res: int):
    """World points ``[N, 3]`` -> (pixel coordinates ``[N, 2]`` (x right, y down), camera depth
    ``[N]`` (> 0 in front)); differentiable in ``verts``."""
    w2c = torch.linalg.inv(c2w.to(verts))
    cam = verts @ w2c[:3, :3].T + w2c[:3, 3]  # (N, 3) camera frame
    f = (res / 2.0) / math.tan(math.radians(float(fov_deg)) / 2.0)
    z = -cam[:, 2]
    zs = z.clamp(min=1e-6)
    x = res / 2.0 + f * cam[:, 0] / zs
    y = res / 2.0 - f * cam[:, 1] / zs  # image rows grow downwards
    return torch.stack([x, y], -1), z


def _edges(tri: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor):
    """Edge functions ``[K, 3]`` (twice the signed areas opposite each corner) and twice the
    triangle's signed area ``[K]`` for triangles ``[K, 3, 2]`` and points ``[K]``."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]  # (K, 2) each

    def edge(p, q):
        return (q[:, 0] - p[:, 0]) * (cy - p[:, 1]) - (q[:, 1] - p[:, 1]) * (cx - p[:, 0])

    w = torch.stack([edge(b, c), edge(c, a), edge(a, b)], -1)  # (K, 3)
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    return w, area


def _pairs(xy: torch.Tensor, faces: torch.Tensor, res: int, margin: float, row0=None,
           chunk: int = 1 << 20):  # fmt: skip
    """(triangle ids ``[K]``, pixel ids ``[K]``) of the pixel centres inside each triangle's
    bounding box grown by ``margin`` pixels (no gradient). Views are stacked vertically (view
    k's rows are ``k res .. (k + 1) res - 1``); ``row0`` ``[F]``: the first row of each
    triangle's view (default 0)."""
    tri = xy[faces]  # (F, 3, 2)
    row0 = torch.zeros(len(faces), dtype=torch.long, device=xy.device) if row0 is None else row0
    lo = torch.ceil(tri.amin(1) - margin - 0.5).long()  # (F, 2)
    hi = torch.floor(tri.amax(1) + margin - 0.5).long()  # (F, 2)
    lo[:, 0].clamp_(0, res - 1)
    hi[:, 0].clamp_(-1, res - 1)
    lo[:, 1] = torch.maximum(torch.minimum(lo[:, 1], row0 + res - 1), row0)
    hi[:, 1] = torch.minimum(torch.maximum(hi[:, 1], row0 - 1), row0 + res - 1)
    span = (hi - lo + 1).clamp(min=0)  # (F, 2)
    valid = (span.amin(1) > 0).nonzero().squeeze(1)
    size = span[valid].amax(1)
    bucket = torch.ceil(torch.log2(size.double().clamp(min=1))).long()
    tris, pixs = [], []
    for b in bucket.unique().tolist():
        s = 1 << b
        ids = valid[bucket == b]
        grid = torch.arange(s, device=xy.device)
        off = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)  # (s*s, 2)
        for part in ids.split(max(1, chunk // (s * s))):
            px = lo[part, 0:1] + off[None, :, 1]  # (P, s*s) columns
            py = lo[part, 1:2] + off[None, :, 0]  # (P, s*s) rows
            ok = (px <= hi[part, 0:1]) & (py <= hi[part, 1:2])
            k, p = ok.nonzero(as_tuple=True)
            tris.append(part[k])
            pixs.append(py[k, p] * res + px[k, p])
    if not tris:
        empty = torch.zeros(0, dtype=torch.long, device=xy.device)
        return empty, empty
    return torch.cat(tris), torch.cat(pixs)


@torch.no_grad()
def _visibility_torch(xy: torch.Tensor, z: torch.Tensor, faces: torch.Tensor, res: int,
                      views: int = 1, row0=None):  # fmt: skip
    """Nearest covering triangle per pixel ``[V*H*W]`` (-1: none) by a z-buffer over the pixel
    centres each triangle covers (views stacked vertically, :func:`_pairs`)."""
    tri_id = torch.full((views * res * res,), -1, dtype=torch.long, device=xy.device)
    t, p = _pairs(xy, faces, res, 0.0, row0)
    if t.numel() == 0:
        return tri_id
    cx = (p % res).to(xy.dtype) + 0.5
    cy = torch.div(p, res, rounding_mode="floor").to(xy.dtype) + 0.5
    w, area = _edges(xy[faces[t]], cx, cy)
    sign = torch.sign(area)[:, None]
    inside = ((w * sign) >= 0).all(1) & (area.abs() > 1e-12)
    t, p, w, area = t[inside], p[inside], w[inside], area[inside]
    lam = w / area[:, None]  # (K, 3) screen-space barycentric weights
    zc = z[faces[t]]  # (K, 3)
    depth = 1.0 / (lam / zc).sum(1)  # perspective-correct depth at the pixel centre
    zbuf = torch.full((views * res * res,), float("inf"), dtype=depth.dtype, device=xy.device)
    zbuf.scatter_reduce_(0, p, depth, reduce="amin")
    win = depth <= zbuf[p]
    tri_id[p[win]] = t[win]
    return tri_id


@torch.no_grad()
def _visibility_nvdiffrast(xy, z, faces, res, ctx):
    """The same as :func:`_visibility_torch` with nvdiffrast's CUDA rasteriser."""
    import nvdiffrast.torch as dr

    # clip space from pixels and depth: x_ndc = 2 x / W - 1, y_ndc = 1 - 2 y / H (up), w = z
    x_ndc = 2.0 * xy[:, 0] / res - 1.0
    y_ndc = 1.0 - 2.0 * xy[:, 1] / res
    near, far = 1e-3, 100.0
    zc = (far + near) / (far - near) * z - 2 * far * near / (far - near)
    clip = torch.stack([x_ndc * z, y_ndc * z, zc, z], -1)[None].float().contiguous()  # (1, N, 4)
    rast, _ = dr.rasterize(ctx, clip, faces.int().contiguous(), (res, res))  # (1, H, W, 4)
    # nvdiffrast's row 0 is y_ndc = -1 (the bottom): flip rows to ours (row 0 at the top)
    ids = rast[0, :, :, 3].flip(0).long() - 1  # (H, W), -1 where empty
    return ids.reshape(-1)


def _bary(tri_xy: torch.Tensor, z: torch.Tensor, cx, cy, clamp: bool) -> torch.Tensor:
    """Perspective-correct barycentric weights ``[K, 3]`` of pixel centres in triangles
    (``tri_xy`` ``[K, 3, 2]``, corner depths ``z`` ``[K, 3]``); ``clamp``: onto the triangle."""
    w, area = _edges(tri_xy, cx, cy)
    area = torch.where(area.abs() < 1e-12, torch.full_like(area, 1e-12), area)
    lam = w / area[:, None]  # (K, 3) screen-space
    if clamp:
        lam = lam.clamp(min=0.0)
        lam = lam / lam.sum(1, keepdim=True).clamp(min=1e-12)
    lam = lam / z.clamp(min=1e-6)
    return lam / lam.sum(1, keepdim=True).clamp(min=1e-12)


def edge_topology(faces: torch.Tensor) -> dict:
    """The unique edges ``[E, 2]`` of a mesh and, per face corner edge ``[M, 3]``, its index
    into them (what :func:`rasterize_views` needs to find silhouette edges; computed once)."""
    faces = faces.long()
    directed = torch.stack([faces, faces.roll(-1, 1)], -1).reshape(-1, 2)  # (M, 3, 2) -> (3M, 2)
    lo, hi = directed.amin(1), directed.amax(1)
    n = int(faces.max()) + 1 if faces.numel() else 1
    keys, inverse = torch.unique(lo * n + hi, return_inverse=True)
    edges = torch.stack([torch.div(keys, n, rounding_mode="floor"), keys % n], -1)  # (E, 2)
    return {"edges": edges, "face_edges": inverse.reshape(-1, 3)}  # (3M,) -> (M, 3)


def _contour_edges(xy: torch.Tensor, z: torch.Tensor, faces: torch.Tensor, topo: dict):
    """Edges ``[C, 2]`` on the view's contour: between a front- and a back-facing triangle
    (screen-space winding), or on one front-facing triangle only (an open border)."""
    tri = xy[faces]  # (M, 3, 2)
    _, area = _edges(tri, tri[:, 0, 0], tri[:, 0, 1])  # twice the signed area per face
    infront = (z[faces] > 1e-4).all(1)
    front = ((area < 0) & infront).to(torch.int64)  # counter-clockwise in y-up is < 0 in y-down
    back = ((area >= 0) & infront).to(torch.int64)
    e = topo["edges"].shape[0]
    fe = topo["face_edges"].reshape(-1)  # (M, 3) -> (3M,)
    n_front = torch.zeros(e, dtype=torch.int64, device=xy.device)
    n_front.index_add_(0, fe, front.repeat_interleave(3))
    n_back = torch.zeros(e, dtype=torch.int64, device=xy.device)
    n_back.index_add_(0, fe, back.repeat_interleave(3))
    on = (n_front > 0) & ((n_back > 0) | (n_front == 1) & (n_back == 0) & _border(topo))
    return topo["edges"][on]


def _border(topo: dict) -> torch.Tensor:
    """Edges ``[E]`` used by one face only (cached in ``topo``)."""
    if "border" not in topo:
        e = topo["edges"].shape[0]
        count = torch.zeros(e, dtype=torch.int64, device=topo["edges"].device)
        count.index_add_(0, topo["face_edges"].reshape(-1), torch.ones_like(count[:1]).expand(
            topo["face_edges"].numel()))  # fmt: skip
        topo["border"] = count == 1
    return topo["border"]


def _segment_distance(seg: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Distance ``[K]`` in pixels from points to segments ``[K, 2, 2]``."""
    pt = torch.stack([cx, cy], -1)  # (K, 2)
    a, b = seg[:, 0], seg[:, 1]
    ab = b - a
    t = ((pt - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-12)
    q = a + t.clamp(0.0, 1.0)[:, None] * ab
    return ((pt - q) ** 2).sum(-1).clamp(min=1e-12).sqrt()


def rasterize_views(verts, faces, c2w, fov_deg, res: int, *, sigma: float = 0.5,
                    backend: str = "torch", ctx=None, topo: dict | None = None) -> dict:  # fmt: skip
    """All views at once, stacked vertically (pixel ``p`` of view ``k`` is ``k H W + p``):
    ``tri`` ``[V*H*W]`` (the triangle whose attributes the pixel shows, as an index into
    ``faces``; -1: none), ``bary`` ``[V*H*W, 3]`` (differentiable, perspective-correct),
    ``alpha`` ``[V*H*W]`` (soft silhouette, differentiable in ``verts``) and ``hard``
    ``[V*H*W]`` (z-buffer coverage).

    The soft silhouette: in a band of ``2 sigma`` pixels around the hard silhouette, a
    pixel's opacity is ``sigmoid(+-d / sigma)``, ``d`` its distance to the nearest contour
    edge (:func:`_contour_edges`), + inside the coverage and - outside: an antialiased edge
    (half a pixel inside a straight edge is 73% covered, the mirrored pixel 27%) whose
    gradient moves the contour's vertices."""
    faces = faces.long()
    topo = edge_topology(faces) if topo is None else topo
    v, n, m = c2w.shape[0], verts.shape[0], faces.shape[0]
    fov = torch.as_tensor(fov_deg, dtype=torch.float32).reshape(-1).expand(v)  # (V,)
    margin = 2.0 * sigma
    r = max(int(math.ceil(margin)), 1)
    dev = verts.device
    xys, zs = [], []
    for k in range(v):
        xy, z = project(verts, c2w[k], float(fov[k]), res)
        xys.append(xy + torch.tensor([0.0, k * res], device=dev, dtype=xy.dtype))
        zs.append(z)
    xy, z = torch.cat(xys), torch.cat(zs)  # V x (N, 2) -> (V*N, 2); (V*N,)
    shift = torch.arange(v, device=dev)
    fa = (faces[None] + (shift * n)[:, None, None]).reshape(-1, 3)  # (V, M, 3) -> (V*M, 3)
    row0 = (shift * res).repeat_interleave(m)  # (V*M,) first row of each face's view
    xyd, zd = xy.detach(), z.detach()
    infront = (zd[fa] > 1e-4).all(1)
    total = v * res * res
    if backend == "nvdiffrast":
        tri = torch.cat([
            _visibility_nvdiffrast(xyd[k * n : (k + 1) * n] - torch.tensor([0.0, k * res],
                                   device=dev), zd[k * n : (k + 1) * n], faces, res, ctx)
            for k in range(v)
        ])  # fmt: skip  # V x (H*W,) -> (V*H*W,) ids into faces
        view_of = torch.arange(total, device=dev) // (res * res)
        tri = torch.where(tri >= 0, tri + view_of * m, tri)
        tri = torch.where((tri >= 0) & infront[tri.clamp(min=0)], tri, -1)
    else:
        ids = infront.nonzero().squeeze(1)
        tri = _visibility_torch(xyd, zd, fa[ids], res, v, row0[ids])
        tri = torch.where(tri >= 0, ids[tri.clamp(min=0)], tri)  # (V*H*W,) ids into fa
    hard = tri >= 0
    alpha = hard.to(xy.dtype)
    img = hard.reshape(v, 1, res, res).float()  # (V*H*W,) -> (V, 1, H, W)
    grown = F.max_pool2d(img, 2 * r + 1, 1, r)
    shrunk = -F.max_pool2d(-img, 2 * r + 1, 1, r)
    band = (grown != shrunk).reshape(-1)  # (V, 1, H, W) -> (V*H*W,)
    with torch.no_grad():
        e = topo["edges"].shape[0]
        topo_all = {
            "edges": (topo["edges"][None] + (shift * n)[:, None, None]).reshape(-1, 2),
            "face_edges": (topo["face_edges"][None] + (shift * e)[:, None, None]).reshape(-1, 3),
            "border": _border(topo).repeat(v),
        }  # fmt: skip  # (V*E, 2), (V*M, 3), (V*E,)
        seg = _contour_edges(xyd, zd, fa, topo_all)  # (C, 2)
        s, p = _pairs(
            xyd, seg, res, margin + 0.5, torch.div(seg[:, 0], n, rounding_mode="floor") * res
        )
        keep = band[p]
        s, p = s[keep], p[keep]
        cx = (p % res).to(xy.dtype) + 0.5
        cy = torch.div(p, res, rounding_mode="floor").to(xy.dtype) + 0.5
        d = _segment_distance(xyd[seg[s]], cx, cy)
        best = torch.full((total,), float("inf"), dtype=xy.dtype, device=dev)
        best.scatter_reduce_(0, p, d, reduce="amin")
        win = d <= best[p]
        s, p, cx, cy = s[win], p[win], cx[win], cy[win]
        pick = torch.full((total,), -1, dtype=torch.long, device=dev)
        pick[p] = torch.arange(p.numel(), device=dev)  # one winner per pixel
        sel = pick[pick >= 0]
        s, p, cx, cy = s[sel], p[sel], cx[sel], cy[sel]
    if p.numel():
        d = _segment_distance(xy[seg[s]], cx, cy)  # (K,) differentiable
        sign = torch.where(hard[p], 1.0, -1.0).to(d)
        alpha = alpha.index_put((p,), torch.sigmoid(sign * d / sigma))
    shown_tri = _grow_ids(tri, v, res, r)  # band pixels outside: a neighbour's triangle
    shown = (shown_tri >= 0).nonzero().squeeze(1)
    bary = torch.zeros(total, 3, dtype=xy.dtype, device=dev)
    if shown.numel():
        fi = fa[shown_tri[shown]]  # (S, 3)
        cx = (shown % res).to(xy.dtype) + 0.5
        cy = torch.div(shown, res, rounding_mode="floor").to(xy.dtype) + 0.5
        bary = bary.index_put((shown,), _bary(xy[fi], z[fi], cx, cy, clamp=True))
    tri_local = torch.where(shown_tri >= 0, shown_tri % max(m, 1), shown_tri)
    return {"tri": tri_local, "bary": bary, "alpha": alpha, "hard": hard}


@torch.no_grad()
def _grow_ids(tri: torch.Tensor, views: int, res: int, rings: int) -> torch.Tensor:
    """Triangle ids ``[V*H*W]`` with empty pixels within ``rings`` of a covered one taking a
    covered neighbour's id (within the same view)."""
    img = tri.reshape(views, res, res)  # (V*H*W,) -> (V, H, W)
    for _ in range(rings):
        pad = F.pad(img[:, None].float(), (1, 1, 1, 1), value=-1.0)[:, 0].long()  # (V, H+2, W+2)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            nb = pad[:, dy : dy + res, dx : dx + res]
            img = torch.where((img < 0) & (nb >= 0), nb, img)
    return img.reshape(-1)


def _shade(normal, light, shading: str, ambient: float, albedo):
    lam = (normal * light).sum(-1, keepdim=True).clamp(min=0.0)
    shade = ambient + (1.0 - ambient) * lam
    base = torch.ones_like(albedo) if shading == "textureless" else albedo
    return base * shade


def render_mesh(verts, faces, uv, texture, c2w, fov_deg, res: int, *, background=None,
                sigma: float = 0.5, backend: str = "torch", shading: str = "albedo",
                light=None, ambient: float = 0.3, ctx=None, topo=None,
                color_fn=None) -> dict:  # fmt: skip
    """Render a UV-textured mesh: ``verts`` ``[N, 3]`` (world, z up), ``faces`` ``[M, 3]``,
    ``uv`` ``[N, 2]`` (origin bottom-left), ``texture`` ``[1, 3, T, T]`` (row 0 at the top),
    cameras ``c2w`` ``[V, 4, 4]`` and ``fov_deg`` (float or ``[V]``).

    Returns ``rgb`` ``[V, 3, H, W]`` over ``background`` (a colour ``[3]``, ``[V, 3]``, or a
    callable ray directions -> colours; default white) and ``opacity`` ``[V, 1, H, W]``; both
    differentiable in ``verts`` and ``texture``. ``shading`` "lambertian" / "textureless"
    use the face normals and ``light`` ``[V, 3]`` (unit directions towards the light).
    ``color_fn`` (optional): surface points ``[P, 3]`` -> colours ``[P, 3]`` added to the
    texture's.
    """
    from mvdiff.sds.render import _background_rays, camera_rays

    v = c2w.shape[0]
    dev = verts.device
    c2w = c2w.to(dev).float()
    views = rasterize_views(
        verts, faces, c2w, fov_deg, res, sigma=sigma, backend=backend, ctx=ctx, topo=topo
    )
    fn = None
    if shading != "albedo":
        tri = verts[faces.long()]  # (M, 3, 3)
        fn = F.normalize(torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1), dim=-1)
    _, d = camera_rays(c2w, fov_deg, res)  # (V, H, W, 3)
    bg = _background_rays(background, d.reshape(-1, 3), res * res, verts.dtype)  # (V*H*W, 3)
    bg = bg.reshape(v, res * res, 3)  # (V*H*W, 3) -> (V, H*W, 3)
    r = views
    shown = (r["tri"] >= 0).nonzero().squeeze(1)
    color = torch.zeros(v * res * res, 3, dtype=verts.dtype, device=dev)
    if shown.numel():
        fi = faces[r["tri"][shown]].long()  # (S, 3)
        lam = r["bary"][shown]  # (S, 3)
        uvp = (lam[..., None] * uv[fi]).sum(1)  # (S, 3, 2) -> (S, 2)
        grid = torch.stack([uvp[:, 0] * 2 - 1, 1 - uvp[:, 1] * 2], -1)  # v up -> rows down
        grid = grid.reshape(1, 1, -1, 2)  # (S, 2) -> (1, 1, S, 2)
        col = F.grid_sample(texture, grid, mode="bilinear", padding_mode="border",
                            align_corners=False)  # fmt: skip  # (1, 3, 1, S)
        col = col[0, :, 0].T  # (1, 3, 1, S) -> (S, 3)
        if color_fn is not None:
            col = col + color_fn((lam[..., None] * verts[fi]).sum(1))  # (S, 3, 3) -> (S, 3)
        col = col.clamp(0.0, 1.0)
        if fn is not None:
            view_of = torch.div(shown, res * res, rounding_mode="floor")
            lt = light.to(dev).reshape(-1, 3).expand(v, 3)[view_of]  # (S, 3)
            col = _shade(fn[r["tri"][shown]], lt, shading, ambient, col)
        color = color.index_put((shown,), col)
    a = r["alpha"][:, None]  # (V*H*W,) -> (V*H*W, 1)
    out = color * a + bg.reshape(-1, 3) * (1.0 - a)  # (V*H*W, 3)
    rgb = out.reshape(v, res, res, 3).permute(0, 3, 1, 2)  # (V*H*W, 3) -> (V, 3, H, W)
    opacity = a.reshape(v, 1, res, res)  # (V*H*W, 1) -> (V, 1, H, W)
    return {"rgb": rgb, "opacity": opacity}
