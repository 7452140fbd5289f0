"""3D Gaussians as a representation for text-to-3D and reconstruction (issue 19).

:class:`GaussianModel` holds N Gaussians as raw parameters with the 3DGS activations:
``means`` ``[N, 3]`` (world, z up), ``quats`` ``[N, 4]`` (w, x, y, z; normalised when used),
``log_scales`` ``[N, 3]`` (scale = exp), ``opacity_logits`` ``[N]`` (opacity = sigmoid) and
``sh`` ``[N, K, 3]`` (real SH coefficients of the colour, K = (degree + 1)^2, degree 0 or 1;
colour = SH_C0 * sh_0 + 0.5 at degree 0). It renders through :func:`mvdiff.sds.splat.rasterize`.

Adaptive density control (3DGS, Kerbl et al. 2023) is done by :meth:`GaussianModel.densify`
(clone small Gaussians and split large ones whose mean view-space positional gradient is
high), :meth:`GaussianModel.prune` (low opacity, too large) and
:meth:`GaussianModel.reset_opacity`; :meth:`GaussianModel.edit` applies such a change to an
Adam optimiser's state too (rows kept, new rows with zero moments). The schedule lives in
:mod:`mvdiff.sds.gaussian_fit`.

:meth:`GaussianModel.density_grid` sums the Gaussians' opacity-weighted densities on a
lattice (each Gaussian only over the cells within 3 sigma), for marching-cubes style meshing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from mvdiff.sds.splat import SH_C0, quat_to_rotmat, rasterize

__all__ = ["GaussianConfig", "GaussianModel"]

_NAMES = ("means", "quats", "log_scales", "opacity_logits", "sh")


@dataclass
class GaussianConfig:
    #: Gaussians at the start, uniformly in the cube [-init_extent / 2, init_extent / 2]^3
    num_init: int = 2000
    init_extent: float = 1.0
    #: optional mesh file (glTF/OBJ/PLY, +Y up like mvdiff's exports) whose surface points
    #: seed the Gaussians instead (normalised to the unit box; loaded by the fit state)
    init_mesh: str | None = None
    init_opacity: float = 0.1
    sh_degree: int = 0
    #: half the cube the mesh / density grid covers (as the field's bound)
    bound: float = 0.6
    # Adam learning rates per attribute (DreamGaussian-like, a little higher for CPU runs)
    lr_means: float = 0.002
    lr_sh: float = 0.02
    lr_opacity: float = 0.05
    lr_scales: float = 0.01
    lr_quats: float = 0.005
    #: final means learning rate as a fraction of lr_means (exponential decay, as 3DGS)
    lr_means_final: float = 0.05
    #: final learning rate of the other attributes as a fraction of theirs (1: constant)
    lr_final: float = 1.0
    # Densification schedule as fractions of the run (3DGS: 500 / 15000 / 100 / 3000 of 30000)
    densify_from: float = 0.05
    densify_until: float = 0.6
    densify_every: float = 0.05
    opacity_reset_every: float = 0.2
    #: mean |d loss / d means2d| (NDC units, summed over the views of a step) that triggers
    #: densification
    grad_threshold: float = 0.0002
    #: clone below, split above this largest scale (fraction of the scene extent 1.0)
    percent_dense: float = 0.01
    prune_opacity: float = 0.005
    #: Gaussians larger than this (world units, largest scale) are pruned
    prune_scale: float = 0.1
    max_gaussians: int = 30000
    #: rasteriser tile side (pixels)
    tile: int = 8
    #: reference views rendered per step for the posed-view loss (random subset; 3DGS: 1)
    ref_views_per_step: int = 1
    #: density at which the mesh surface is extracted
    mesh_level: float = 0.5


class GaussianModel(nn.Module):
    """N 3D Gaussians (module docstring). ``GaussianModel(config)`` initialises
    ``config.num_init`` of them uniformly in the box, or at ``points`` ``[N, 3]`` (with
    optional ``colors`` ``[N, 3]``); ``GaussianModel(config, num=n)`` makes ``n`` zeros to load
    a state dict into."""

    def __init__(
        self,
        config: GaussianConfig | None = None,
        num: int | None = None,
        generator=None,
        points: torch.Tensor | None = None,
        colors: torch.Tensor | None = None,
    ):
        super().__init__()
        self.config = c = config or GaussianConfig()
        if c.sh_degree not in (0, 1):
            raise ValueError(f"sh_degree must be 0 or 1, got {c.sh_degree}")
        self.bound = float(c.bound)
        k = (c.sh_degree + 1) ** 2
        if num is not None:
            self._set(
                torch.zeros(num, 3), torch.zeros(num, 4), torch.zeros(num, 3), torch.zeros(num),
                torch.zeros(num, k, 3),
            )  # fmt: skip
            return
        if points is not None:
            means = points.float()
            n = means.shape[0]
        else:
            n = c.num_init
            means = (torch.rand(n, 3, generator=generator) - 0.5) * c.init_extent
        spacing = (c.init_extent**3 / n) ** (1 / 3)  # mean distance between neighbours
        if colors is None:
            colors = 0.5 + 0.05 * torch.randn(n, 3, generator=generator)
        sh = torch.zeros(n, k, 3)
        sh[:, 0] = (colors - 0.5) / SH_C0
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1.0
        op = torch.full((n,), math.log(c.init_opacity / (1 - c.init_opacity)))
        self._set(means, quats, torch.full((n, 3), math.log(0.5 * spacing)), op, sh)

    def _set(self, means, quats, log_scales, opacity_logits, sh):
        for name, t in zip(_NAMES, (means, quats, log_scales, opacity_logits, sh)):
            setattr(self, name, nn.Parameter(t.detach().float().contiguous()))

    # -- activations ---------------------------------------------------------------------
    @property
    def num(self) -> int:
        return self.means.shape[0]

    @property
    def scales(self) -> torch.Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def colors(self) -> torch.Tensor:
        """View-independent colour ``[N, 3]`` (the DC term)."""
        return (SH_C0 * self.sh[:, 0] + 0.5).clamp(min=0.0)

    def render(self, c2w, fov_deg, size: int, background=None, means2d_out=None) -> dict:
        """``rgb`` ``[V, 3, H, W]``, ``opacity``, ``depth`` ``[V, 1, H, W]``, ``radii`` ``[V, N]``
        (see :func:`mvdiff.sds.splat.rasterize_torch`)."""
        colors = self.sh if self.config.sh_degree > 0 else self.colors
        return rasterize(
            self.means, self.quats, self.scales, self.opacities, colors,
            c2w.to(self.means.device), fov_deg, size, size, background=background,
            tile=self.config.tile, means2d_out=means2d_out,
        )  # fmt: skip

    # -- adaptive density control -----------------------------------------------------------
    @torch.no_grad()
    def edit(self, keep: torch.Tensor, new: dict | None = None, optimizer=None) -> None:
        """Keep the rows ``keep`` (bool ``[N]``) and append ``new`` (raw parameters by name);
        the optimiser's per-row Adam moments follow (zeros for the new rows)."""
        params = {}
        for name in _NAMES:
            old = getattr(self, name)
            t = old.data[keep]
            if new is not None:
                t = torch.cat([t, new[name].to(t)])
            p = nn.Parameter(t.contiguous())
            if optimizer is not None:
                for group in optimizer.param_groups:
                    at = [i for i, q in enumerate(group["params"]) if q is old]
                    if not at:
                        continue
                    group["params"][at[0]] = p
                    state = optimizer.state.pop(old, None)
                    if state:
                        for key in ("exp_avg", "exp_avg_sq"):
                            s = state[key][keep]
                            if new is not None:
                                s = torch.cat([s, torch.zeros_like(new[name]).to(s)])
                            state[key] = s
                        optimizer.state[p] = state
            params[name] = p
        for name, p in params.items():
            setattr(self, name, p)

    @torch.no_grad()
    def densify(self, grad_mean: torch.Tensor, optimizer=None, generator=None) -> dict:
        """Clone (largest scale <= ``percent_dense``) or split (larger; two samples of the
        Gaussian at scale / 1.6) the Gaussians whose ``grad_mean`` ``[N]`` exceeds the
        threshold, up to ``max_gaussians``. Returns the counts."""
        c = self.config
        hot = grad_mean >= c.grad_threshold
        room = max(c.max_gaussians - self.num, 0)
        if int(hot.sum()) > room:  # keep the highest gradients
            top = torch.topk(torch.where(hot, grad_mean, torch.full_like(grad_mean, -1.0)), room)
            hot = torch.zeros_like(hot)
            hot[top.indices] = True
        big = self.scales.amax(1) > c.percent_dense
        clone, split = hot & ~big, hot & big
        new = {n: getattr(self, n).data[clone] for n in _NAMES}
        if split.any():
            s = self.scales[split]  # (S, 3)
            rot = quat_to_rotmat(self.quats[split])  # (S, 3, 3)
            parts = []
            for _ in range(2):
                z = torch.randn(s.shape, generator=generator).to(s) * s  # (S, 3) local offsets
                parts.append(
                    {
                        "means": self.means[split] + (rot @ z[..., None])[..., 0],
                        "quats": self.quats[split],
                        "log_scales": torch.log(s / 1.6),
                        "opacity_logits": self.opacity_logits[split],
                        "sh": self.sh[split],
                    }
                )
            new = {n: torch.cat([new[n]] + [p[n] for p in parts]) for n in _NAMES}
        self.edit(~split, new, optimizer)
        return {"cloned": int(clone.sum()), "split": int(split.sum())}

    @torch.no_grad()
    def prune(self, optimizer=None, max_scale: float | None = None) -> int:
        """Drop Gaussians with opacity < ``prune_opacity`` or largest scale > ``max_scale``
        (default ``prune_scale``); at least one is kept. Returns how many were dropped."""
        c = self.config
        limit = c.prune_scale if max_scale is None else max_scale
        drop = (self.opacities < c.prune_opacity) | (self.scales.amax(1) > limit)
        if bool(drop.all()):
            drop[torch.argmax(self.opacities)] = False
        if drop.any():
            self.edit(~drop, None, optimizer)
        return int(drop.sum())

    @torch.no_grad()
    def reset_opacity(self, value: float = 0.01, optimizer=None) -> None:
        """Clamp every opacity to at most ``value`` (3DGS's periodic reset); Adam moments of the
        opacities are zeroed."""
        cap = math.log(value / (1 - value))
        self.opacity_logits.data.clamp_(max=cap)
        if optimizer is not None:
            state = optimizer.state.get(self.opacity_logits)
            if state:
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()

    # -- geometry ------------------------------------------------------------------------------
    @torch.no_grad()
    def density_grid(self, resolution: int = 64, with_color: bool = False, chunk: int = 2**22):
        """Opacity-weighted Gaussian density ``sum_i o_i exp(-d^T Σ_i^-1 d / 2)`` on a
        ``[R, R, R]`` lattice over [-bound, bound]^3 indexed [ix, iy, iz]; with ``with_color``
        also the density-weighted mean colour ``[R, R, R, 3]``."""
        r, b = resolution, self.bound
        dev = self.means.device
        cell = 2 * b / (r - 1)
        rot = quat_to_rotmat(self.quats)  # (N, 3, 3)
        inv_s = 1.0 / self.scales.clamp(min=1e-6)
        # each Gaussian covers the cells within 3 of its largest standard deviations
        half = torch.ceil(3 * self.scales.amax(1) / cell).clamp(1, r // 2).long()  # (N,)
        centre = torch.round((self.means + b) / cell).long()  # (N, 3) nearest lattice index
        dens = torch.zeros(r**3, device=dev)
        col = torch.zeros(r**3, 3, device=dev)
        colors = self.colors
        for h in torch.unique(half).tolist():
            ids = (half == h).nonzero().squeeze(1)  # (M,)
            ax = torch.arange(-h, h + 1, device=dev)
            off = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
            per = max(1, chunk // off.shape[0])
            for s in range(0, ids.numel(), per):
                i = ids[s : s + per]
                cells = centre[i][:, None] + off[None]  # (M, C, 3)
                inside = ((cells >= 0) & (cells < r)).all(-1)  # (M, C)
                pts = cells.float() * cell - b  # (M, C, 3) lattice points
                local = (pts - self.means[i][:, None]) @ rot[i]  # (M, C, 3) Gaussian frame
                m = ((local * inv_s[i][:, None]) ** 2).sum(-1)  # (M, C) Mahalanobis²
                w = self.opacities[i][:, None] * torch.exp(-0.5 * m) * inside
                flat = (cells.clamp(0, r - 1) * torch.tensor([r * r, r, 1], device=dev)).sum(-1)
                dens.index_add_(0, flat.reshape(-1), w.reshape(-1))
                if with_color:
                    wc = w[..., None] * colors[i][:, None]  # (M, C, 3)
                    col.index_add_(0, flat.reshape(-1), wc.reshape(-1, 3))
        grid = dens.reshape(r, r, r)  # (R^3,) -> (R, R, R)
        if not with_color:
            return grid
        color = (col / dens.clamp(min=1e-8)[:, None]).reshape(
            r, r, r, 3
        )  # (R^3, 3) -> (R, R, R, 3)
        return grid, color

    @torch.no_grad()
    def extract_mesh(self, resolution: int = 64, level: float | None = None):
        """(vertices, faces, vertex colours) of the ``level`` iso-surface of
        :meth:`density_grid` (default ``mesh_level``), by :func:`mvdiff.sds.mesh.
        marching_tetrahedra`; colours from the density-weighted colour grid."""
        import numpy as np
        import torch.nn.functional as F

        from mvdiff.sds.mesh import marching_tetrahedra

        level = self.config.mesh_level if level is None else level
        grid, color = self.density_grid(resolution, with_color=True)
        verts, faces = marching_tetrahedra(grid.cpu().numpy(), level, self.bound)
        colors = np.zeros_like(verts)
        if len(verts):
            # grid_sample's (x, y, z) index (W, H, D): the grid is [ix, iy, iz] -> permute to D=z.
            vol = color.permute(3, 2, 1, 0)[None].cpu()  # (R, R, R, 3) -> (1, 3, Rz, Ry, Rx)
            g = torch.from_numpy(verts / self.bound).float().reshape(1, -1, 1, 1, 3)
            c = F.grid_sample(vol, g, mode="bilinear", align_corners=True)  # (1, 3, V, 1, 1)
            colors = c.reshape(3, -1).t().clamp(0, 1).numpy()  # (3, V) -> (V, 3)
        return verts, faces, colors
