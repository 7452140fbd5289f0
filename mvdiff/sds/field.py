"""A pure-PyTorch radiance field: multi-resolution dense grids + small MLP heads.

No custom CUDA: the encoding is a stack of dense 3D feature grids of increasing resolution,
sampled trilinearly with :func:`torch.nn.functional.grid_sample`, so the same code runs on a
CPU and a GPU. Density starts as a centred blob (the usual SDS initialisation) so that the
first renders are a soft sphere rather than empty space.

Coordinates are world coordinates (z up, docs/design.md §4); the field covers the cube
``[-bound, bound]^3`` (assets are normalised to a unit bounding box, so ``bound`` is a little
over 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FieldConfig", "GridEncoding", "RadianceField"]


@dataclass
class FieldConfig:
    bound: float = 0.6
    #: grid resolutions per level, coarse to fine (geometric if not given)
    resolutions: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    features_per_level: int = 2
    hidden: int = 32
    #: density = density_scale * softplus(mlp + blob_scale * (1 - |x| / blob_radius))
    blob_scale: float = 5.0
    blob_radius: float = 0.35
    density_scale: float = 10.0
    init_std: float = 1e-2


class GridEncoding(nn.Module):
    """Trilinear features from a stack of dense grids ``[1, F, R, R, R]`` over [-bound, bound]^3."""

    def __init__(self, resolutions, features_per_level: int, bound: float, init_std: float):
        super().__init__()
        self.bound = float(bound)
        self.grids = nn.ParameterList(
            nn.Parameter(torch.randn(1, features_per_level, r, r, r) * init_std)
            for r in resolutions
        )
        self.out_dim = features_per_level * len(self.grids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, 3]`` world points -> ``[N, out_dim]`` features (zero outside the cube)."""
        n = x.shape[0]
        # grid_sample's last coordinate axis is (x -> W, y -> H, z -> D): a consistent mapping.
        g = (x / self.bound).reshape(1, n, 1, 1, 3)  # (N, 3) -> (1, N, 1, 1, 3)
        feats = []
        for grid in self.grids:
            f = F.grid_sample(grid, g, mode="bilinear", padding_mode="zeros", align_corners=True)
            feats.append(f.reshape(grid.shape[1], n))  # (1, F, N, 1, 1) -> (F, N)
        return torch.cat(feats, dim=0).t().contiguous()  # (L*F, N) -> (N, L*F)


class RadianceField(nn.Module):
    """Density and (view-independent) colour at world points."""

    def __init__(self, config: FieldConfig | None = None):
        super().__init__()
        self.config = config = config or FieldConfig()
        self.bound = float(config.bound)
        self.encoding = GridEncoding(
            config.resolutions, config.features_per_level, config.bound, config.init_std
        )
        # One hidden layer shared by a density head (1) and a colour head (3): half the
        # matmuls of two separate MLPs, which matters on a CPU.
        self.trunk = nn.Sequential(nn.Linear(self.encoding.out_dim, config.hidden), nn.ReLU())
        self.density_head = nn.Linear(config.hidden, 1)
        self.color_head = nn.Linear(config.hidden, 3)

    def blob_bias(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        return c.blob_scale * (1.0 - x.norm(dim=-1) / c.blob_radius)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[N, 3]`` -> (density ``[N]`` >= 0, colour ``[N, 3]`` in [0, 1])."""
        h = self.trunk(self.encoding(x))
        raw = self.density_head(h).squeeze(-1) + self.blob_bias(x)  # (N, 1) -> (N,)
        sigma = self.config.density_scale * F.softplus(raw)
        return sigma, torch.sigmoid(self.color_head(h))

    def density(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(self.encoding(x))
        raw = self.density_head(h).squeeze(-1) + self.blob_bias(x)  # (N, 1) -> (N,)
        return self.config.density_scale * F.softplus(raw)

    def normals(self, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """Unit normals ``[N, 3]`` = -grad(density) / |grad(density)| (for optional shading)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            sigma = self.density(x)
            (g,) = torch.autograd.grad(sigma.sum(), x, create_graph=create_graph)
        return -F.normalize(g, dim=-1, eps=1e-6)

    def forward_with_normals(self, x: torch.Tensor, create_graph: bool = False):
        """(density ``[N]``, colour ``[N, 3]``, unit normals ``[N, 3]``) in one field pass.

        ``create_graph`` keeps the normals differentiable (needed when shading is trained)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            h = self.trunk(self.encoding(xg))
            raw = self.density_head(h).squeeze(-1) + self.blob_bias(xg)  # (N, 1) -> (N,)
            sigma = self.config.density_scale * F.softplus(raw)
            color = torch.sigmoid(self.color_head(h))
            (g,) = torch.autograd.grad(sigma.sum(), xg, create_graph=create_graph)
        normals = -F.normalize(g, dim=-1, eps=1e-6)
        if not create_graph:
            sigma, color = sigma.detach(), color.detach()
        return sigma, color, normals

    @torch.no_grad()
    def density_grid(self, resolution: int = 64, chunk: int = 65536) -> torch.Tensor:
        """Density sampled on a ``[R, R, R]`` lattice over [-bound, bound]^3, indexed [ix, iy, iz]."""
        dev = next(self.parameters()).device
        lin = torch.linspace(-self.bound, self.bound, resolution, device=dev)
        pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1)  # (R, R, R, 3)
        pts = pts.reshape(-1, 3)  # (R, R, R, 3) -> (R^3, 3)
        out = torch.cat([self.density(p) for p in pts.split(chunk)])
        return out.reshape(resolution, resolution, resolution)  # (R^3,) -> (R, R, R)


def geometric_resolutions(base: int, finest: int, levels: int) -> list[int]:
    """Resolutions ``base * b**i`` ending at ``finest`` (Instant-NGP style growth)."""
    if levels == 1:
        return [finest]
    b = math.exp((math.log(finest) - math.log(base)) / (levels - 1))
    return [int(round(base * b**i)) for i in range(levels)]
