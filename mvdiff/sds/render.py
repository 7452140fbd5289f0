"""Volume rendering of a :class:`~mvdiff.sds.field.RadianceField` from mvdiff cameras.

Cameras follow DESIGN §4: z-up world, OpenGL camera frame (looks down -z, +y up), c2w
matrices, square images with ``f = (W/2) / tan(fov/2)`` (:func:`mvdiff.cameras.intrinsics_from_fov`).
Rays are sampled (stratified) inside the field's cube ``[-bound, bound]^3``; points whose
ray misses the cube, or that fall in an empty cell of an optional :class:`OccupancyGrid`,
are never sent through the field. Compositing is the usual emission-absorption quadrature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mvdiff.cameras import intrinsics_from_fov

__all__ = ["OccupancyGrid", "camera_rays", "ray_box", "render", "random_background"]


def _device(field, fallback) -> torch.device:
    p = next(iter(field.parameters()), None) if hasattr(field, "parameters") else None
    if p is not None:
        return p.device
    return fallback.device if fallback is not None else torch.device("cpu")


def camera_rays(c2w: torch.Tensor, fov_deg, height: int, width: int | None = None):
    """Ray origins and unit directions ``[V, H, W, 3]`` for c2w ``[V, 4, 4]`` and fov (deg).

    ``fov_deg`` is a float or ``[V]``. Pixel centres; row 0 is the top of the image.
    """
    width = height if width is None else width
    c2w = c2w.float()
    v = c2w.shape[0]
    fovs = torch.as_tensor(fov_deg, dtype=torch.float64).reshape(-1).expand(v)  # () | (V,) -> (V,)
    dev = c2w.device
    j = torch.arange(width, device=dev, dtype=torch.float32) + 0.5
    i = torch.arange(height, device=dev, dtype=torch.float32) + 0.5
    ii, jj = torch.meshgrid(i, j, indexing="ij")  # (H, W) each
    dirs = []
    for k in range(v):
        K = intrinsics_from_fov(float(fovs[k]), width, height)
        x = (jj - K[0, 2]) / K[0, 0]
        y = -(ii - K[1, 2]) / K[1, 1]  # image rows go down, camera +y goes up
        d = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # (H, W, 3) camera frame
        dirs.append(d @ c2w[k, :3, :3].t())  # (H, W, 3) -> (H, W, 3) world frame
    d = F.normalize(torch.stack(dirs), dim=-1)  # V x (H, W, 3) -> (V, H, W, 3)
    o = c2w[:, None, None, :3, 3].expand_as(d)  # (V, 3) -> (V, H, W, 3)
    return o, d


def ray_box(o: torch.Tensor, d: torch.Tensor, bound: float):
    """Slab test against ``[-bound, bound]^3``: (near, far, hit), each ``[...]``; near >= 0."""
    safe = torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t0 = (-bound - o) / safe
    t1 = (bound - o) / safe
    near = torch.minimum(t0, t1).amax(dim=-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(dim=-1)
    hit = far > near
    near = torch.where(hit, near, torch.zeros_like(near))
    far = torch.where(hit, far, torch.zeros_like(far))
    return near, far, hit


class OccupancyGrid:
    """A coarse boolean grid of where the density is non-negligible (for sample skipping).

    ``update(field)`` evaluates the density at jittered cell centres and keeps an exponential
    moving maximum; cells whose value is below ``threshold`` are skipped by :func:`render`.
    """

    def __init__(self, bound: float, resolution: int = 32, threshold: float = 0.5, decay=0.9):
        self.bound, self.res, self.threshold, self.decay = (
            float(bound),
            resolution,
            threshold,
            decay,
        )
        self.values = None
        self.occupied = None

    @torch.no_grad()
    def update(self, field, generator: torch.Generator | None = None) -> float:
        """Refresh from ``field``; returns the occupied fraction."""
        r, b = self.res, self.bound
        dev = _device(field, None)
        idx = torch.arange(r, device=dev, dtype=torch.float32)
        cells = torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), -1)  # (R, R, R, 3)
        cells = cells.reshape(-1, 3)  # (R, R, R, 3) -> (R^3, 3)
        jitter = torch.rand(cells.shape, generator=generator).to(dev)
        pts = (cells + jitter) / r * (2 * b) - b
        sigma = field.density(pts).reshape(r, r, r)  # (R^3,) -> (R, R, R)
        self.values = (
            sigma if self.values is None else torch.maximum(self.values * self.decay, sigma)
        )
        self.occupied = self.values > self.threshold
        return float(self.occupied.float().mean())

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean ``[N]`` for points ``[N, 3]`` (all True before the first update)."""
        if self.occupied is None:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        i = ((x + self.bound) / (2 * self.bound) * self.res).long().clamp(0, self.res - 1)
        return self.occupied[i[:, 0], i[:, 1], i[:, 2]]


def random_background(num: int, generator: torch.Generator | None = None, p_random: float = 0.5):
    """Background colours ``[num, 3]``: white, or (with probability ``p_random``) random."""
    if float(torch.rand((), generator=generator)) < p_random:
        return torch.rand(1, 3, generator=generator).expand(num, 3)
    return torch.ones(num, 3)


def render(
    field,
    c2w: torch.Tensor,
    fov_deg,
    resolution: int,
    num_samples: int = 64,
    background=None,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    occupancy: OccupancyGrid | None = None,
    return_normals: bool = False,
) -> dict:
    """Render V views of ``field``.

    Returns ``rgb`` ``[V, 3, H, W]`` (composited over ``background``: a colour ``[3]`` or
    ``[V, 3]``, default white), ``opacity`` ``[V, 1, H, W]``, ``depth`` ``[V, 1, H, W]``
    (expected ray distance of the visible surface, 0 where empty), optionally ``normal``
    ``[V, 3, H, W]`` (world frame, from the density gradient), and ``num_evaluated`` (points
    sent through the field).
    """
    dev = _device(field, c2w)
    c2w = c2w.to(dev)
    v, h, w, s = c2w.shape[0], resolution, resolution, num_samples
    o, d = camera_rays(c2w, fov_deg, h, w)
    o = o.reshape(-1, 3)  # (V, H, W, 3) -> (R, 3)
    d = d.reshape(-1, 3)  # (V, H, W, 3) -> (R, 3)
    near, far, hit = ray_box(o, d, field.bound)
    n_rays = o.shape[0]
    steps = torch.arange(s, device=dev, dtype=torch.float32)
    if stratified:
        u = torch.rand(n_rays, s, generator=generator).to(dev)
    else:
        u = torch.full((n_rays, s), 0.5, device=dev)
    length = (far - near)[:, None]  # (R,) -> (R, 1)
    t = near[:, None] + length * (steps[None] + u) / s  # (R, S)
    delta = (length / s).expand(n_rays, s)  # (R, 1) -> (R, S)
    pts = o[:, None] + d[:, None] * t[..., None]  # (R, S, 3)

    keep = hit[:, None].expand(n_rays, s).reshape(-1)  # (R, S) -> (R*S,)
    flat = pts.reshape(-1, 3)  # (R, S, 3) -> (R*S, 3)
    if occupancy is not None:
        keep = keep & occupancy.query(flat)
    sel = keep.nonzero().squeeze(1)  # (K, 1) -> (K,)
    sigma_k, color_k = field(flat[sel])
    sigma = torch.zeros(n_rays * s, device=dev, dtype=sigma_k.dtype).index_put((sel,), sigma_k)
    color = torch.zeros(n_rays * s, 3, device=dev, dtype=color_k.dtype).index_put((sel,), color_k)
    sigma = sigma.reshape(n_rays, s)  # (R*S,) -> (R, S)
    color = color.reshape(n_rays, s, 3)  # (R*S, 3) -> (R, S, 3)

    alpha = 1.0 - torch.exp(-sigma * delta)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], 1), 1)
    weights = alpha * trans[:, :-1]  # (R, S)
    opacity = weights.sum(1, keepdim=True)  # (R, 1)
    rgb = (weights[..., None] * color).sum(1)  # (R, S, 3) -> (R, 3)
    depth = (weights * t).sum(1, keepdim=True)  # (R, 1)

    if background is None:
        background = torch.ones(3)
    bg = torch.as_tensor(background, dtype=rgb.dtype).to(dev)
    bg = bg.reshape(-1, 3).expand(v, 3)  # (3,) | (V, 3) -> (V, 3)
    bg = bg[:, None, :].expand(v, h * w, 3).reshape(-1, 3)  # (V, 3) -> (R, 3)
    rgb = rgb + (1.0 - opacity) * bg

    def image(x):  # (R, C) -> (V, C, H, W)
        return x.reshape(v, h, w, -1).permute(0, 3, 1, 2)  # (R, C) -> (V, H, W, C) -> (V, C, H, W)

    out = {
        "rgb": image(rgb),
        "opacity": image(opacity),
        "depth": image(depth),
        "num_evaluated": int(sel.numel()),
    }
    if return_normals:
        n = torch.zeros(n_rays * s, 3, device=dev)
        n = n.index_put((sel,), field.normals(flat[sel], create_graph=torch.is_grad_enabled()))
        n = (weights[..., None] * n.reshape(n_rays, s, 3)).sum(1)  # (R, S, 3) -> (R, 3)
        out["normal"] = image(F.normalize(n, dim=-1, eps=1e-6))
    return out
