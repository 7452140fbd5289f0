"""A differentiable 3D Gaussian splatting rasteriser in pure PyTorch (CPU or GPU).

Cameras follow docs/design.md §4 (:mod:`mvdiff.cameras`): z-up world, OpenGL camera frame (looks
down -z, +y up), c2w matrices, ``f = (W/2) / tan(fov/2)``, principal point at the image
centre; pixel ``(row i, column j)`` has its centre at ``(u, v) = (j + 0.5, i + 0.5)``, the
same rays as :func:`mvdiff.sds.render.camera_rays`.

Steps (those of the 3DGS paper, Kerbl et al. 2023):

1. **Project** each Gaussian: its mean to pixel coordinates, its covariance
   ``R S S^T R^T`` to 2D with the Jacobian of the perspective projection at the mean (EWA
   splatting), plus ``dilation`` (0.3 px²) on the diagonal as a low-pass filter. Gaussians
   behind ``near`` are dropped.
2. **Sort** by camera depth.
3. **Composite** front to back per pixel: ``alpha_i = min(0.99, o_i exp(-d^T Σ^-1 d / 2))``,
   set to 0 below 1/255; ``T_i = prod_{j<i} (1 - alpha_j)``; ``C = sum_i c_i alpha_i T_i``.
   The work is dense per tile: every pixel of a tile against every Gaussian whose footprint
   (the bounding box of the ellipse where ``o exp(-m / 2) >= 1/255``: tighter than a 3-sigma
   circle for faint or elongated Gaussians, and exact) touches the tile, in chunks of tiles,
   so memory grows with the overlaps, not with Gaussians x pixels.

Projection is plain tensor operations (autograd); the compositing has a hand-written backward
(:class:`_Composite`, about twice as fast on a CPU as autograd through its intermediates), so
gradients reach means, rotations, scales, opacities and colours. :func:`rasterize` uses ``gsplat`` instead when it is
installed, the tensors are on CUDA and ``backend="auto"``; the CPU path never imports it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "ALPHA_MAX",
    "ALPHA_MIN",
    "SH_C0",
    "eval_sh",
    "project_gaussians",
    "quat_to_rotmat",
    "rasterize",
    "rasterize_torch",
]

#: the 3DGS clamps: alpha is at most 0.99, and contributions below 1/255 are skipped
ALPHA_MAX = 0.99
ALPHA_MIN = 1.0 / 255.0
#: zeroth-order real spherical harmonic (the DC term of the 3DGS colour)
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199


def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[N, 3, 3]`` of quaternions ``[N, 4]`` (w, x, y, z; normalised here)."""
    q = F.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, -1).reshape(-1, 3, 3)  # (N, 9) -> (N, 3, 3)


def eval_sh(sh: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Colour ``[..., 3]`` from SH coefficients ``[..., K, 3]`` (K = 1 or 4: degree 0 or 1) and
    unit view directions ``[..., 3]`` (camera to Gaussian), 3DGS style: ``max(0, SH + 0.5)``."""
    k = sh.shape[-2]
    out = SH_C0 * sh[..., 0, :]
    if k >= 4:
        x, y, z = dirs[..., 0:1], dirs[..., 1:2], dirs[..., 2:3]
        out = (
            out - SH_C1 * y * sh[..., 1, :] + SH_C1 * z * sh[..., 2, :] - SH_C1 * x * sh[..., 3, :]
        )
    elif k != 1:
        raise ValueError(f"SH with {k} coefficients: only degree 0 (1) or 1 (4) are supported")
    return (out + 0.5).clamp(min=0.0)


def _focal(fov_deg: float, width: int) -> float:
    return (width / 2.0) / math.tan(math.radians(float(fov_deg)) / 2.0)


def project_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    c2w: torch.Tensor,
    fov_deg: float,
    width: int,
    height: int,
    near: float = 0.01,
    dilation: float = 0.3,
) -> dict:
    """Project Gaussians into one camera (``c2w`` ``[4, 4]``).

    Returns ``means2d`` ``[N, 2]`` (u, v pixels), ``cov2d`` ``[N, 2, 2]`` (dilated), ``conic``
    ``[N, 3]`` (the inverse's a, b, c of ``[[a, b], [b, c]]``), ``depth`` ``[N]`` (distance along
    the viewing axis), ``radius`` ``[N]`` (3 sigma, pixels), ``valid`` ``[N]`` bool (in front of
    ``near``) and ``compensation`` ``[N]`` (``sqrt(det Σ / det Σ_dilated)``, for anti-aliasing).
    """
    dt = means.dtype
    c2w = c2w.to(means.device, dt)
    rot = c2w[:3, :3]
    # world -> camera: R^T (x - t); rows of (x - t) @ R are the camera-frame points.
    p = (means - c2w[:3, 3]) @ rot  # (N, 3)
    depth = -p[:, 2]
    valid = depth > near
    d = torch.where(valid, depth, torch.ones_like(depth))
    fx = fy = _focal(fov_deg, width)  # square pixels, equal fov (docs/design.md §4)
    cx, cy = width / 2.0, height / 2.0
    u = cx + fx * p[:, 0] / d
    v = cy - fy * p[:, 1] / d  # image rows go down, camera +y goes up
    # Jacobian of (u, v) w.r.t. the camera-frame point, at a clamped position (as 3DGS does:
    # Gaussians far outside the frustum would otherwise get huge footprints).
    lim_x = 1.3 * (width / 2.0) / fx
    lim_y = 1.3 * (height / 2.0) / fy
    tx = (p[:, 0] / d).clamp(-lim_x, lim_x) * d
    ty = (p[:, 1] / d).clamp(-lim_y, lim_y) * d
    zero = torch.zeros_like(d)
    jac = torch.stack(
        [fx / d, zero, fx * tx / (d * d), zero, -fy / d, -fy * ty / (d * d)], -1
    ).reshape(-1, 2, 3)  # (N, 6) -> (N, 2, 3); d(u, v) / d(x, y, z) with depth = -z
    r = quat_to_rotmat(quats)  # (N, 3, 3)
    m = r * scales[:, None, :]  # (N, 3, 3) = R S
    cov3d = m @ m.transpose(1, 2)  # (N, 3, 3) world frame
    cov_cam = rot.t() @ cov3d @ rot  # (N, 3, 3) camera frame
    cov2d = jac @ cov_cam @ jac.transpose(1, 2)  # (N, 2, 2)
    det_raw = cov2d[:, 0, 0] * cov2d[:, 1, 1] - cov2d[:, 0, 1] ** 2
    eye = torch.eye(2, dtype=dt, device=means.device)
    cov2d = cov2d + dilation * eye
    a, b, c = cov2d[:, 0, 0], cov2d[:, 0, 1], cov2d[:, 1, 1]
    det = (a * c - b * b).clamp(min=1e-12)
    conic = torch.stack([c / det, -b / det, a / det], -1)  # (N, 3)
    mid = 0.5 * (a + c)
    lam = mid + torch.sqrt((mid * mid - det).clamp(min=0.1))
    radius = torch.ceil(3.0 * torch.sqrt(lam.detach()))
    return {
        "means2d": torch.stack([u, v], -1),  # (N, 2)
        "cov2d": cov2d,
        "conic": conic,
        "depth": depth,
        "radius": radius,
        "valid": valid,
        "compensation": torch.sqrt((det_raw / det).clamp(min=0.0)),
    }


class _Composite(torch.autograd.Function):
    """Front-to-back compositing with a hand-written backward (no autograd graph of the
    ``[T, K, P]`` intermediates: one saved alpha and transmittance instead of a dozen).

    Inputs: ``coef`` ``[T, K, 6]`` (the exponent of each Gaussian as a quadratic form in the
    pixel basis, log-opacity included; -inf for padding), ``basis`` ``[T, P, 6]`` (no
    gradient), ``feats`` ``[T, K, C]`` (composited quantities). Outputs ``[T, P, C]`` features
    and ``[T, P]`` accumulated alpha.

    With ``w_k = alpha_k T_k`` and ``T_k = prod_{j<k} (1 - alpha_j)``: d out / d feats_k = w_k;
    d L / d alpha_k = T_k G_k - (sum_{j>k} w_j G_j) / (1 - alpha_k), where ``G_k = g . feats_k
    + g_acc`` (the gradient of L with respect to w_k); d alpha / d z = alpha where
    ALPHA_MIN <= alpha < ALPHA_MAX (else 0: clamped or skipped).
    """

    @staticmethod
    def forward(ctx, coef, basis, feats):
        # pixels first, Gaussians last: the depth scans (cumsum) run over contiguous memory
        alpha = torch.bmm(basis, coef.transpose(1, 2))  # (T, P, 6) x (T, 6, K) -> (T, P, K)
        alpha = F.threshold(alpha.exp_().clamp_(max=ALPHA_MAX), ALPHA_MIN, 0.0)  # skip < 1/255
        # Exclusive transmittance in log space: T_k = exp(sum_{j<k} log(1 - alpha_j)).
        log1m = torch.log1p(-alpha)  # (T, P, K)
        trans = torch.cumsum(log1m, dim=2).sub_(log1m).exp_()  # exclusive: without the own term
        weights = alpha * trans  # (T, P, K)
        out = torch.bmm(weights, feats)  # (T, P, K) x (T, K, C) -> (T, P, C)
        ctx.save_for_backward(alpha, trans, weights, basis, feats)
        return out, weights.sum(2)  # (T, P, C), (T, P, K) -> (T, P)

    @staticmethod
    def backward(ctx, g_out, g_acc):
        alpha, trans, weights, basis, feats = ctx.saved_tensors
        d_feats = torch.bmm(weights.transpose(1, 2), g_out)  # (T, K, P) x (T, P, C) -> (T, K, C)
        g = torch.bmm(g_out, feats.transpose(1, 2))  # (T, P, C) x (T, C, K) -> (T, P, K)
        g.add_(g_acc[..., None])  # dL/dw_k per pixel
        wg = weights * g  # (T, P, K)
        # sum_{j>k} w_j G_j: the total minus the inclusive prefix
        suffix = torch.cumsum(wg, dim=2).neg_().add_(wg.sum(2, keepdim=True))
        d_alpha = g.mul_(trans).sub_(suffix.div_(1.0 - alpha))  # (T, P, K)
        # d alpha / d z = alpha below the clamp (and 0 where skipped: alpha is 0 there)
        d_z = d_alpha.mul_(F.threshold(-alpha, -ALPHA_MAX, 0.0)).neg_()
        d_coef = torch.bmm(d_z.transpose(1, 2), basis)  # (T, K, P) x (T, P, 6) -> (T, K, 6)
        return d_coef, None, d_feats


def _composite_tiles(
    pix: torch.Tensor,
    idx: torch.Tensor,
    ok: torch.Tensor,
    means2d: torch.Tensor,
    conic: torch.Tensor,
    opac: torch.Tensor,
    feats: torch.Tensor,
):
    """Front-to-back compositing of pixels ``pix`` ``[T, P, 2]`` against the Gaussians
    ``idx`` ``[T, K]`` (depth order, ``ok`` masks the padding). ``feats`` ``[N, C]`` are the
    quantities composited (colour and depth). Returns (features ``[T, P, C]``, alpha ``[T, P]``)."""
    centre = pix.mean(1, keepdim=True)  # (T, 1, 2): coordinates relative to the tile centre
    q = pix - centre  # (T, P, 2)
    mu = means2d[idx] - centre  # (T, K, 2)
    con = conic[idx]  # (T, K, 3): a, b, c of [[a, b], [b, c]]
    a, b, c = con.unbind(-1)
    mx, my = mu.unbind(-1)
    # -1/2 (x - m)^T C (x - m) is linear in (x², y², xy, x, y, 1): one batched matmul
    # padding: log-opacity -inf, so its alpha is exactly 0
    pad = torch.zeros(ok.shape, dtype=opac.dtype, device=ok.device).masked_fill_(~ok, -math.inf)
    coef = torch.stack(
        [-0.5 * a, -0.5 * c, -b, a * mx + b * my, c * my + b * mx,
         -0.5 * (a * mx * mx + c * my * my) - b * mx * my + torch.log(opac[idx]) + pad],
        -1,
    )  # fmt: skip  # (T, K, 6), the last term carrying log(opacity)
    qx, qy = q.unbind(-1)
    basis = torch.stack([qx * qx, qy * qy, qx * qy, qx, qy, torch.ones_like(qx)], -1)  # (T, P, 6)
    return _Composite.apply(coef, basis, feats[idx])


def rasterize_torch(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    c2w: torch.Tensor,
    fov_deg,
    width: int,
    height: int | None = None,
    background=None,
    tile: int = 8,
    chunk: int = 2**22,
    near: float = 0.01,
    dilation: float = 0.3,
    means2d_out: list | None = None,
) -> dict:
    """Render V views of N Gaussians with the pure-PyTorch rasteriser (module docstring).

    Args:
        means ``[N, 3]`` world positions; quats ``[N, 4]`` (w, x, y, z, any norm); scales
        ``[N, 3]`` (standard deviations, > 0); opacities ``[N]`` in [0, 1]; colors ``[N, 3]``
        RGB or ``[N, K, 3]`` SH coefficients (K = 1 or 4); c2w ``[V, 4, 4]`` or ``[4, 4]``;
        fov_deg a float or ``[V]``; background None (black: premultiplied), a colour ``[3]`` or
        ``[V, 3]``; tile: tile side in pixels; chunk: elements per compositing chunk
        (tiles x Gaussians x pixels); ``means2d_out``: if a list, each view's projected means
        ``[N, 2]`` (with ``retain_grad``) is appended, for densification by screen-space gradient.

    Returns ``rgb`` ``[V, 3, H, W]`` (over ``background``), ``opacity`` ``[V, 1, H, W]``,
    ``depth`` ``[V, 1, H, W]`` (alpha-weighted camera depth, not normalised), ``radii``
    ``[V, N]`` (0 where not drawn) and ``background`` ``[V, 3, H, W]``.
    """
    height = width if height is None else height
    c2w = c2w.reshape(-1, 4, 4)  # (4, 4) | (V, 4, 4) -> (V, 4, 4)
    v = c2w.shape[0]
    fovs = torch.as_tensor(fov_deg, dtype=torch.float64).reshape(-1).expand(v)  # () | (V,) -> (V,)
    dev, dt = means.device, means.dtype
    th, tw = -(-height // tile), -(-width // tile)  # tiles per column / row
    ty, tx = torch.meshgrid(
        torch.arange(th, device=dev), torch.arange(tw, device=dev), indexing="ij"
    )
    ty, tx = ty.reshape(-1), tx.reshape(-1)  # (th, tw) -> (T,)
    oy, ox = torch.meshgrid(
        torch.arange(tile, device=dev), torch.arange(tile, device=dev), indexing="ij"
    )
    # pixel centres of each tile: (T, P, 2) with P = tile * tile, (u, v) = (col + .5, row + .5)
    pu = (tx[:, None] * tile + ox.reshape(1, -1)).to(dt) + 0.5
    pv = (ty[:, None] * tile + oy.reshape(1, -1)).to(dt) + 0.5
    pix = torch.stack([pu, pv], -1)  # (T, P, 2)
    rgbs, alphas, depths, radii_all = [], [], [], []
    for k in range(v):
        proj = project_gaussians(
            means, quats, scales, c2w[k], float(fovs[k]), width, height, near, dilation
        )
        means2d = proj["means2d"]
        if means2d_out is not None and means2d.requires_grad:
            means2d.retain_grad()
            means2d_out.append(means2d)
        if colors.ndim == 3:
            dirs = F.normalize(means - c2w[k, :3, 3].to(dt), dim=-1)
            col = eval_sh(colors, dirs)
        else:
            col = colors
        radius = proj["radius"]
        m2 = means2d.detach()
        # Each Gaussian's footprint: the bounding box of the ellipse where o exp(-m / 2) is at
        # least ALPHA_MIN (m = 2 ln(o / ALPHA_MIN)); outside it nothing is drawn, so the cull is
        # exact. Smaller than the 3-sigma circle for faint or elongated Gaussians.
        cov = proj["cov2d"].detach()
        m_max = 2.0 * torch.log(opacities.detach().clamp(min=1e-12) / ALPHA_MIN)  # (N,)
        ex = torch.sqrt(m_max.clamp(min=0.0) * cov[:, 0, 0]) * 1.001 + 1e-3
        ey = torch.sqrt(m_max.clamp(min=0.0) * cov[:, 1, 1]) * 1.001 + 1e-3
        x0 = ((m2[:, 0] - ex) / tile).floor()
        x1 = ((m2[:, 0] + ex) / tile).floor()
        y0 = ((m2[:, 1] - ey) / tile).floor()
        y1 = ((m2[:, 1] + ey) / tile).floor()
        on = proj["valid"] & (m_max >= 0) & (x1 >= 0) & (x0 < tw) & (y1 >= 0) & (y0 < th)
        radii_all.append(torch.where(on, radius, torch.zeros_like(radius)))
        vis = on.nonzero().squeeze(1)  # (M,) the Gaussians drawn in this view
        order = vis[torch.argsort(proj["depth"].detach()[vis])]  # (M,) front to back
        hits = (
            (tx[:, None] >= x0[order][None])
            & (tx[:, None] <= x1[order][None])
            & (ty[:, None] >= y0[order][None])
            & (ty[:, None] <= y1[order][None])
        )  # (T, M) in depth order
        counts = hits.sum(1)  # (T,)
        n = order.numel()
        rank = torch.arange(n, device=dev)[None]
        key = torch.where(hits, rank, torch.full_like(rank, n))  # (T, M): rank or n (absent)
        pos = torch.sort(key, dim=1).values  # (T, M): each tile's depth ranks first
        feats = torch.cat([col, proj["depth"][:, None]], -1)  # (N, 4)
        opac = opacities.clamp(min=1e-12)
        # Tiles in groups of similar overlap counts, each padded to its own largest count.
        by_count = torch.argsort(counts, descending=True)
        sorted_counts = counts[by_count].tolist()
        out = torch.zeros(pix.shape[0], tile * tile, 4, dtype=dt, device=dev)
        alpha = torch.zeros(pix.shape[0], tile * tile, dtype=dt, device=dev)
        s, busy = 0, int((counts > 0).sum())  # tiles no Gaussian touches stay empty
        while s < busy:
            kmax = sorted_counts[s]
            per = max(1, chunk // (kmax * tile * tile))
            e = s + 1  # the group: tiles with at least 60% of its largest count (less padding)
            while e < min(s + per, busy) and sorted_counts[e] >= 0.6 * kmax:
                e += 1
            per = e - s
            grp = by_count[s:e]  # (G,)
            sel = pos[grp, :kmax]  # (G, K)
            ok = sel < n
            idx = order[sel.clamp(max=n - 1)]  # (G, K) Gaussian ids
            o, a = _composite_tiles(pix[grp], idx, ok, means2d, proj["conic"], opac, feats)
            out = out.index_put((grp,), o)
            alpha = alpha.index_put((grp,), a)
            s += per
        # tiles -> image: (T, P, C) -> (th, tw, tile, tile, C) -> (th, tile, tw, tile, C)
        img = torch.cat([out, alpha[..., None]], -1).reshape(th, tw, tile, tile, 5)
        img = img.permute(0, 2, 1, 3, 4).reshape(th * tile, tw * tile, 5)[:height, :width]
        rgbs.append(img[..., :3])
        depths.append(img[..., 3:4])
        alphas.append(img[..., 4:5])
    rgb = torch.stack(rgbs).permute(0, 3, 1, 2)  # V x (H, W, 3) -> (V, 3, H, W)
    alpha = torch.stack(alphas).permute(0, 3, 1, 2)  # V x (H, W, 1) -> (V, 1, H, W)
    depth = torch.stack(depths).permute(0, 3, 1, 2)  # V x (H, W, 1) -> (V, 1, H, W)
    if background is None:
        bg = torch.zeros(v, 3, dtype=dt, device=dev)
    else:
        bg = torch.as_tensor(background, dtype=dt).to(dev).reshape(-1, 3).expand(v, 3)  # (V, 3)
    bg_img = bg[:, :, None, None].expand(v, 3, height, width)  # (V, 3) -> (V, 3, H, W)
    return {
        "rgb": rgb + (1.0 - alpha) * bg_img,
        "opacity": alpha,
        "depth": depth,
        "radii": torch.stack(radii_all),  # (V, N)
        "background": bg_img,
    }


def _gsplat_available(t: torch.Tensor) -> bool:
    if t.device.type != "cuda":
        return False
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


def rasterize_gsplat(
    means, quats, scales, opacities, colors, c2w, fov_deg, width, height=None, background=None,
    near: float = 0.01, means2d_out: list | None = None,
) -> dict:  # fmt: skip
    """The same contract as :func:`rasterize_torch` on gsplat's CUDA kernels (``gsplat`` >= 1.0).

    gsplat takes OpenCV world-to-camera matrices: ``viewmat = inverse(c2w_gl @ GL_TO_CV)``."""
    from gsplat import rasterization

    from mvdiff.cameras import GL_TO_CV

    height = width if height is None else height
    c2w = c2w.reshape(-1, 4, 4).to(means)  # (V, 4, 4)
    v = c2w.shape[0]
    fovs = torch.as_tensor(fov_deg, dtype=torch.float64).reshape(-1).expand(v)
    flip = torch.as_tensor(GL_TO_CV, dtype=means.dtype, device=means.device)
    viewmats = torch.linalg.inv(c2w @ flip)  # (V, 4, 4) OpenCV w2c
    ks = torch.zeros(v, 3, 3, dtype=means.dtype, device=means.device)
    for k in range(v):
        f = _focal(float(fovs[k]), width)
        ks[k] = torch.tensor([[f, 0, width / 2.0], [0, f, height / 2.0], [0, 0, 1.0]])
    sh_degree = None
    if colors.ndim == 3:
        sh_degree = 0 if colors.shape[1] == 1 else 1
    rendered, alpha, meta = rasterization(
        means, F.normalize(quats, dim=-1), scales, opacities, colors, viewmats, ks, width, height,
        near_plane=near, sh_degree=sh_degree, render_mode="RGB+ED", packed=False,
    )  # fmt: skip
    if means2d_out is not None and meta["means2d"].requires_grad:
        meta["means2d"].retain_grad()  # (V, N, 2) pixels
        means2d_out.append(meta["means2d"])
    rgb = rendered[..., :3].permute(0, 3, 1, 2)  # (V, H, W, 3) -> (V, 3, H, W)
    depth = (rendered[..., 3:4] * alpha).permute(0, 3, 1, 2)  # expected depth -> weighted sum
    alpha = alpha.permute(0, 3, 1, 2)  # (V, H, W, 1) -> (V, 1, H, W)
    if background is None:
        bg = torch.zeros(v, 3, dtype=means.dtype, device=means.device)
    else:
        bg = torch.as_tensor(background, dtype=means.dtype).to(means.device).reshape(-1, 3)
        bg = bg.expand(v, 3)
    bg_img = bg[:, :, None, None].expand(v, 3, height, width)
    radii = meta["radii"]
    radii = radii.amax(-1) if radii.ndim == 3 else radii  # (V, N, 2) -> (V, N) in gsplat >= 1.5
    return {
        "rgb": rgb + (1.0 - alpha) * bg_img,
        "opacity": alpha,
        "depth": depth,
        "radii": radii.to(means.dtype),
        "background": bg_img,
    }


def rasterize(*args, backend: str = "auto", **kwargs) -> dict:
    """:func:`rasterize_gsplat` when ``backend`` is "gsplat", or "auto" with gsplat installed
    and CUDA tensors; otherwise :func:`rasterize_torch`."""
    if backend not in ("auto", "torch", "gsplat"):
        raise ValueError(f"backend must be auto, torch or gsplat, got {backend!r}")
    means = args[0] if args else kwargs["means"]
    if backend == "gsplat" or (backend == "auto" and _gsplat_available(means)):
        torch_only = ("tile", "chunk", "dilation")  # gsplat tiles itself; its eps2d is 0.3
        kwargs = {k: w for k, w in kwargs.items() if k not in torch_only}
        return rasterize_gsplat(*args, **kwargs)
    return rasterize_torch(*args, **kwargs)
