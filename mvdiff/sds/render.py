"""Volume rendering of a :class:`~mvdiff.sds.field.RadianceField` from mvdiff cameras.

Cameras follow docs/design.md §4: z-up world, OpenGL camera frame (looks down -z, +y up), c2w
matrices, square images with ``f = (W/2) / tan(fov/2)`` (:func:`mvdiff.cameras.intrinsics_from_fov`).
Rays are sampled (stratified) inside the field's cube ``[-bound, bound]^3``; points whose
ray misses the cube, or that fall in an empty cell of an optional :class:`OccupancyGrid`,
are never sent through the field. Compositing is the usual emission-absorption quadrature.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from mvdiff.cameras import intrinsics_from_fov

logger = logging.getLogger(__name__)

__all__ = [
    "OccupancyGrid",
    "camera_rays",
    "ray_box",
    "render",
    "render_rays",
    "random_background",
    "sample_light",
]


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
        #: :meth:`select` with a fixed sample budget (``nonzero_static``): None = on accelerators
        #: only (on the CPU ``nonzero`` costs no wait); True / False force it (tests).
        self.static_budget: bool | None = None
        self.budget: int | None = None  # samples per render for the static path; None = unknown
        self._seen = None  # device scalar: the most samples any render has kept (no host read)

    def _use_budget(self, keep: torch.Tensor) -> bool:
        if self.static_budget is None:
            return keep.device.type != "cpu"
        return self.static_budget

    def select(self, keep: torch.Tensor):
        """Indices of the True entries of ``keep`` ``[N]`` and a validity mask (None = all valid).

        ``nonzero``'s output shape depends on the data, so on an accelerator it makes the host
        wait for the device at every render. There (``static_budget``) the indices come from
        ``nonzero_static`` with a fixed budget, padded with index 0 and marked invalid in the
        mask (callers zero the density of those samples): no wait. The budget is sized at each
        :meth:`update`, which reads the device anyway, from the most samples any render kept
        (x1.25, rounded up to 64 Ki); until a count exists, ``nonzero`` is used. A render that
        keeps more samples than the budget drops the ones past it (the last rays in the batch)
        until the next :meth:`update` grows the budget; ``overflows`` counts those updates.
        """
        count = keep.sum()
        self._seen = count if self._seen is None else torch.maximum(self._seen, count)
        if not self._use_budget(keep) or self.budget is None:
            return keep.nonzero().squeeze(1), None  # (K, 1) -> (K,)
        sel = torch.nonzero_static(keep, size=self.budget, fill_value=0).squeeze(1)  # (B,)
        valid = torch.arange(self.budget, device=keep.device) < count  # (B,)
        return sel, valid

    def _resize_budget(self, seen: int) -> None:
        if seen <= 0:
            return
        if self.budget is not None and seen > self.budget:
            self.overflows += 1
            logger.warning(
                "occupancy: a render kept %d samples, over the budget of %d: grown",
                seen,
                self.budget,
            )
        chunk = 1 << 16
        want = -(-int(seen * 1.25) // chunk) * chunk  # ceil to a multiple of 64 Ki
        self.budget = max(self.budget or 0, want)

    overflows = 0

    @torch.no_grad()
    def update(self, field, generator: torch.Generator | None = None) -> float:
        """Refresh from ``field``; returns the occupied fraction (and, with a static budget,
        re-sizes it from the sample counts seen: one host read for both)."""
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
        fraction = self.occupied.float().mean()
        if self._seen is None or not self._use_budget(self._seen):
            return float(fraction)
        seen = self._seen.float()
        fraction, seen = torch.stack([fraction, seen]).tolist()  # one host read for both
        self._resize_budget(int(seen))
        return fraction

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean ``[N]`` for points ``[N, 3]`` (all True before the first update)."""
        if self.occupied is None:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        i = ((x + self.bound) / (2 * self.bound) * self.res).long().clamp(0, self.res - 1)
        return self.occupied[i[:, 0], i[:, 1], i[:, 2]]


def random_background(num: int, generator: torch.Generator | None = None, p_random: float = 0.5):
    """Background colours ``[num, 3]``: white, or (with probability ``p_random``) random."""
    if float(torch.rand((), generator=generator)) < p_random:
        return torch.rand(1, 3, generator=generator).expand(num, 3)  # (1, 3) -> (N, 3)
    return torch.ones(num, 3)


def sample_light(c2w: torch.Tensor, generator: torch.Generator | None = None, jitter=0.5):
    """Unit light directions ``[V, 3]`` (towards the light) near each camera's direction,
    jittered (DreamFusion-style random point light seen as a directional one)."""
    to_cam = F.normalize(c2w[:, :3, 3].float(), dim=-1)  # (V, 4, 4) -> (V, 3)
    noise = torch.randn(to_cam.shape, generator=generator).to(to_cam.device)
    return F.normalize(to_cam + jitter * noise, dim=-1)


SHADING_MODES = ("albedo", "lambertian", "textureless")


def _background_rays(background, d: torch.Tensor, per_ray_rows: int, dtype) -> torch.Tensor:
    """Background colours ``[R, 3]``: from a callable (directions -> colours), a colour ``[3]``,
    per-ray colours ``[R, 3]``, or per-group colours ``[G, 3]`` repeated over ``per_ray_rows``."""
    n = d.shape[0]
    if background is None:
        return torch.ones(n, 3, device=d.device, dtype=dtype)
    if callable(background) and not isinstance(background, torch.Tensor):
        return background(d).to(dtype)
    bg = torch.as_tensor(background, dtype=dtype).to(d.device).reshape(-1, 3)  # (G, 3)
    if bg.shape[0] == n:
        return bg
    bg = bg.expand(n // per_ray_rows, 3) if bg.shape[0] == 1 else bg  # (1, 3) -> (G, 3)
    return bg.repeat_interleave(per_ray_rows, dim=0)  # (G, 3) -> (R, 3)


def _composite_packed(sigma, color, t, delta, ray_of, n_rays: int):
    """Emission-absorption over samples ``[K]`` listed ray by ray, in order along each ray
    (``ray_of`` ``[K]`` non-decreasing). Returns per-sample weights ``[K]`` and per-ray
    opacity ``[R, 1]``, colour ``[R, 3]`` and depth ``[R, 1]``.

    The exclusive optical depth of each sample is a cumulative sum over all samples minus the
    sum at the start of its ray; the sum runs in float64, where thousands of rays' depths add
    up without eating the few digits a single ray needs."""
    tau = sigma * delta  # (K,) optical depth of each sample
    cs = torch.cumsum(tau.double(), 0) - tau.double()  # (K,) exclusive running sum
    first = torch.ones_like(ray_of, dtype=torch.bool)
    first[1:] = ray_of[1:] != ray_of[:-1]  # (K,) the first kept sample of each ray
    # the running sum where each sample's ray starts, with no data-dependent shape (indexing by
    # ``first`` would make the host wait for the device): the sum never decreases, so the
    # latest ray start at or before each sample is a running maximum
    start = torch.where(first, cs, torch.full_like(cs, -torch.inf)).cummax(0).values  # (K,)
    trans = torch.exp(-(cs - start)).to(sigma.dtype)  # (K,) transmittance before each
    weights = (1.0 - torch.exp(-tau)) * trans  # (K,)
    per = torch.cat([weights[:, None], weights[:, None] * color, (weights * t)[:, None]], 1)
    acc = sigma.new_zeros(n_rays, 5).index_add(0, ray_of, per)  # (K, 5) -> (R, 5)
    return weights, acc[:, 0:1], acc[:, 1:4], acc[:, 4:5]  # opacity, rgb, depth


def render_rays(
    field,
    o: torch.Tensor,
    d: torch.Tensor,
    num_samples: int = 64,
    background=None,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    occupancy: OccupancyGrid | None = None,
    return_normals: bool = False,
    shading: str = "albedo",
    light: torch.Tensor | None = None,
    ambient: float = 0.3,
    rays_per_group: int | None = None,
    packed: bool = False,
) -> dict:
    """Render rays ``o``, ``d`` ``[R, 3]`` (unit directions). Returns per-ray ``rgb`` ``[R, 3]``
    (over ``background``), ``opacity`` / ``depth`` ``[R, 1]``, ``background`` ``[R, 3]``,
    optionally ``normal`` ``[R, 3]``, and ``num_evaluated``.

    ``background``: None (white), a colour ``[3]``, colours ``[R, 3]`` or ``[G, 3]`` (one per
    group of ``rays_per_group`` consecutive rays), or a callable directions -> colours.
    ``shading``: "albedo" (none), "lambertian" (colour * (ambient + (1 - ambient) * max(0,
    n.l))) or "textureless" (the same with white albedo), with normals from the density
    gradient and ``light`` ``[R, 3]`` unit directions towards the light.
    ``packed``: composite only the samples sent through the field (a flat list grouped by
    ray: :func:`_composite_packed`) instead of scattering them back into a dense ``[R, S]``
    grid first; the same result (no 1e-10 transmittance floor), far less work when the
    occupancy grid skips most samples.
    """
    if shading not in SHADING_MODES:
        raise ValueError(f"shading must be one of {SHADING_MODES}, got {shading!r}")
    dev = _device(field, o)
    o, d = o.to(dev), d.to(dev)
    n_rays, s = o.shape[0], num_samples
    near, far, hit = ray_box(o, d, field.bound)
    steps = torch.arange(s, device=dev, dtype=torch.float32)
    if stratified:
        # drawn where the generator lives: a generator on the render device means no copy
        # (FitState.render_generator); a CPU one means a host draw and a transfer
        gdev = generator.device if generator is not None else dev
        u = torch.rand(n_rays, s, generator=generator, device=gdev).to(dev)
    else:
        u = torch.full((n_rays, s), 0.5, device=dev)
    length = (far - near)[:, None]  # (R,) -> (R, 1)
    t = near[:, None] + length * (steps[None] + u) / s  # (R, S)
    delta = (length / s).expand(n_rays, s)  # (R, 1) -> (R, S)
    pts = o[:, None] + d[:, None] * t[..., None]  # (R, S, 3)

    keep = hit[:, None].expand(n_rays, s).reshape(-1)  # (R, S) -> (R*S,)
    flat = pts.reshape(-1, 3)  # (R, S, 3) -> (R*S, 3)
    valid = None  # (K,) bool where selection is padded to a fixed budget (packed only)
    if occupancy is not None:
        keep = keep & occupancy.query(flat)
    if occupancy is not None and packed:
        sel, valid = occupancy.select(keep)
    else:
        sel = keep.nonzero().squeeze(1)  # (K, 1) -> (K,)
    need_normals = return_normals or shading != "albedo"
    normal_k = None
    if need_normals:
        create = torch.is_grad_enabled()
        if hasattr(field, "forward_with_normals"):
            sigma_k, color_k, normal_k = field.forward_with_normals(flat[sel], create_graph=create)
        else:
            sigma_k, color_k = field(flat[sel])
            normal_k = field.normals(flat[sel], create_graph=create)
    else:
        sigma_k, color_k = field(flat[sel])
    if shading != "albedo":
        ray_of = torch.div(sel, s, rounding_mode="floor")  # sample index -> ray index
        lam = (normal_k * light.to(dev)[ray_of]).sum(-1, keepdim=True).clamp(min=0.0)
        shade = ambient + (1.0 - ambient) * lam  # (K, 1)
        albedo = torch.ones_like(color_k) if shading == "textureless" else color_k
        color_k = albedo * shade
    if valid is not None:
        sigma_k = torch.where(valid, sigma_k, 0.0)  # padding samples: no density, no weight
    if packed:
        ray_of = torch.div(sel, s, rounding_mode="floor")  # (K,) ray of each kept sample
        weights_k, opacity, rgb, depth = _composite_packed(
            sigma_k, color_k, t.reshape(-1)[sel], delta.reshape(-1)[sel], ray_of, n_rays
        )  # (R, S) -> (R*S,) -> (K,) for t and delta
        out = _composited(rgb, opacity, depth, background, d, rays_per_group or n_rays, sel)
        if return_normals:
            n = torch.zeros(n_rays, 3, device=dev, dtype=normal_k.dtype)
            n = n.index_add(0, ray_of, weights_k[:, None] * normal_k)  # (K, 3) -> (R, 3)
            out["normal"] = F.normalize(n, dim=-1, eps=1e-6)
        return out
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
    out = _composited(rgb, opacity, depth, background, d, rays_per_group or n_rays, sel)
    if return_normals:
        n = torch.zeros(n_rays * s, 3, device=dev, dtype=normal_k.dtype)
        n = n.index_put((sel,), normal_k)
        n = (weights[..., None] * n.reshape(n_rays, s, 3)).sum(1)  # (R*S, 3) -> (R, S, 3) -> (R, 3)
        out["normal"] = F.normalize(n, dim=-1, eps=1e-6)
    return out


def _composited(rgb, opacity, depth, background, d, rays_per_group: int, sel) -> dict:
    """The render's output (packed and dense compositing alike): ``rgb`` over the background."""
    bg = _background_rays(background, d, rays_per_group, rgb.dtype)
    return {
        "rgb": rgb + (1.0 - opacity) * bg,
        "opacity": opacity,
        "depth": depth,
        "background": bg,
        "num_evaluated": int(sel.numel()),
    }


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
    shading: str = "albedo",
    light: torch.Tensor | None = None,
    ambient: float = 0.3,
    packed: bool = False,
) -> dict:
    """Render V views of ``field``.

    Returns ``rgb`` ``[V, 3, H, W]`` (composited over ``background``: a colour ``[3]`` or
    ``[V, 3]``, a callable ray directions ``[N, 3]`` -> colours ``[N, 3]`` such as an
    environment map, default white), ``opacity`` ``[V, 1, H, W]``, ``depth`` ``[V, 1, H, W]``
    (expected ray distance of the visible surface, 0 where empty), ``background``
    ``[V, 3, H, W]``, optionally ``normal`` ``[V, 3, H, W]`` (world frame, from the density
    gradient), and ``num_evaluated`` (points sent through the field). ``shading`` and
    ``light`` (``[V, 3]`` unit directions towards the light, see :func:`sample_light`) as in
    :func:`render_rays`, and ``packed`` too.
    """
    dev = _device(field, c2w)
    c2w = c2w.to(dev)
    v, h, w = c2w.shape[0], resolution, resolution
    o, d = camera_rays(c2w, fov_deg, h, w)
    o = o.reshape(-1, 3)  # (V, H, W, 3) -> (R, 3)
    d = d.reshape(-1, 3)  # (V, H, W, 3) -> (R, 3)
    if light is not None:
        light = light.to(dev).reshape(-1, 3).expand(v, 3)  # (3,) | (V, 3) -> (V, 3)
        light = light.repeat_interleave(h * w, dim=0)  # (V, 3) -> (R, 3)
    elif shading != "albedo":
        raise ValueError(f"shading {shading!r} needs a light direction")
    out = render_rays(
        field, o, d, num_samples, background=background, stratified=stratified,
        generator=generator, occupancy=occupancy, return_normals=return_normals,
        shading=shading, light=light, ambient=ambient, rays_per_group=h * w, packed=packed,
    )  # fmt: skip

    def image(x):  # (R, C) -> (V, C, H, W)
        return x.reshape(v, h, w, -1).permute(0, 3, 1, 2)  # (R, C) -> (V, H, W, C) -> (V, C, H, W)

    res = {k: image(val) for k, val in out.items() if isinstance(val, torch.Tensor)}
    res["num_evaluated"] = out["num_evaluated"]
    return res
