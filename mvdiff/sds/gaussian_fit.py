"""The Gaussian-splatting side of the fit loop (``representation: gaussians``, issue 19).

:class:`GaussianFitState` has the interface :func:`mvdiff.sds.loop.train_step`,
:class:`mvdiff.sds.text_to_3d.SDSTerm` and the exports use, like
:class:`mvdiff.sds.loop.FitState` for the radiance field:

* ``render(c2w, fov_deg, size, background=..., generator=..., training=..., shading=...,
  light=..., ambient=...)`` -> ``rgb`` ``[V, 3, H, W]``, ``opacity`` / ``depth``
  ``[V, 1, H, W]``, ``background``;
* ``prepare_ref(views, resolution, indices)`` and ``ref_loss(ref, config)``: the posed-view
  term (RGB + mask MSE, the same as the field's) — on whole images of up to
  ``ref_views_per_step`` random reference views per step, since a rasteriser draws images,
  not rays;
* ``before_step(step)`` / ``after_step(step)``: adaptive density control on the 3DGS
  schedule scaled to ``config.steps`` (:class:`~mvdiff.sds.gaussians.GaussianConfig`);
* ``mesh(resolution)``, ``export_asset(config, output, ref, resolution)``, ``write_outputs(folder)`` (``gaussians.ply``), ``state_dict()`` /
  ``load_state_dict()`` (tensors only: the checkpoint loads with ``weights_only=True``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from mvdiff.config import validate_config
from mvdiff.sds.background import Background
from mvdiff.sds.gaussians import GaussianModel

__all__ = ["GaussianFitState", "GaussianGridField", "mesh_surface_points"]

log = logging.getLogger(__name__)

_LR = {"means": "lr_means", "quats": "lr_quats", "log_scales": "lr_scales",
       "opacity_logits": "lr_opacity", "sh": "lr_sh"}  # fmt: skip


def mesh_surface_points(path, n: int, generator=None):
    """``n`` random surface points ``[n, 3]`` of a mesh file (+Y up, as mvdiff's exports and
    glTF), in the z-up world, normalised like the assets (bounding box centred, longest side 1),
    and their colours ``[n, 3]`` (None without vertex colours)."""
    import numpy as np
    import trimesh

    from mvdiff.errors import UserError
    from mvdiff.sds.mesh import Z_UP_TO_Y_UP

    path = Path(path)
    if not path.is_file():
        raise UserError(f"gaussians.init_mesh {path}: no such file")
    try:
        mesh = trimesh.load(path, force="mesh")
    except Exception as e:  # trimesh raises many kinds for unreadable files
        raise UserError(f"gaussians.init_mesh {path}: not a readable mesh ({e})") from None
    if len(mesh.faces) == 0:
        raise UserError(f"gaussians.init_mesh {path}: no triangles")
    seed = int(torch.randint(2**31 - 1, (), generator=generator))
    pts, face_ids = trimesh.sample.sample_surface(mesh, n, seed=seed)
    pts = torch.from_numpy(np.asarray(pts) @ Z_UP_TO_Y_UP).float()  # +Y up -> z up
    lo, hi = pts.amin(0), pts.amax(0)
    pts = (pts - (lo + hi) / 2) / (hi - lo).amax().clamp(min=1e-8)
    colors = None
    vc = getattr(mesh.visual, "vertex_colors", None)
    if vc is not None and len(vc) == len(mesh.vertices):
        tri = np.asarray(vc)[np.asarray(mesh.faces)[face_ids], :3].mean(1) / 255.0  # (n, 3)
        colors = torch.from_numpy(tri).float()
    return pts, colors


class GaussianGridField(torch.nn.Module):
    """3D Gaussians seen as a field for the mesh export: their opacity-weighted density and
    density-weighted colour (:meth:`GaussianModel.density_grid`) on a ``resolution``³ lattice
    over the cube, sampled trilinearly. Has what :func:`mvdiff.sds.asset.export_asset` uses
    of a radiance field: ``bound``, ``density_grid(resolution)``, ``field(x) -> (density
    [N], colour [N, 3])`` and a (empty) parameter naming the device."""

    def __init__(self, gaussians: GaussianModel, resolution: int):
        super().__init__()
        self.gaussians, self.bound, self.resolution = gaussians, float(gaussians.bound), resolution
        grid, color = gaussians.density_grid(resolution, with_color=True)
        # grid_sample's (x, y, z) index (W, H, D): the lattice is [ix, iy, iz] -> (z, y, x)
        vol = torch.cat([grid[..., None], color], -1)  # (R, R, R, 4)
        self.volume = vol.permute(3, 2, 1, 0)[None].contiguous()  # -> (1, 4, Rz, Ry, Rx)
        self.grid = grid
        self.device_marker = torch.nn.Parameter(torch.zeros(0, device=grid.device), False)

    @torch.no_grad()
    def density_grid(self, resolution: int = 64, chunk: int | None = None) -> torch.Tensor:
        if resolution == self.resolution:
            return self.grid
        return self.gaussians.density_grid(resolution)

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        g = (x.float() / self.bound).reshape(1, -1, 1, 1, 3)  # (N, 3) -> (1, N, 1, 1, 3)
        v = F.grid_sample(self.volume, g, mode="bilinear", align_corners=True)  # (1, 4, N, 1, 1)
        v = v.reshape(4, -1).t()  # (1, 4, N, 1, 1) -> (N, 4)
        return v[:, 0], v[:, 1:].clamp(0.0, 1.0)


def _at(fraction: float, steps: int) -> int:
    return int(round(fraction * steps))


class GaussianFitState:
    """Gaussians, background, Adam (one group per attribute), densification statistics and the
    generator of one run, seeded from ``config.seed``."""

    config_keys = ("gaussians", "background")
    #: checkpoint entries that are dicts of tensors (checked by :func:`mvdiff.sds.loop.restore`)
    checkpoint_parts = ("gaussians", "background")

    def __init__(self, config, device="cpu"):
        validate_config(config)
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.device = torch.device(device)
        points = colors = None
        if config.gaussians.init_mesh:
            points, colors = mesh_surface_points(
                config.gaussians.init_mesh, config.gaussians.num_init, self.generator
            )
        self.gaussians = GaussianModel(
            config.gaussians, generator=self.generator, points=points, colors=colors
        ).to(device)
        with torch.random.fork_rng(devices=[]):  # initial weights from config.seed only
            torch.default_generator.manual_seed(config.seed)  # CPU only: CUDA untouched
            self.background = Background(config.background).to(device)
        self._build_optimizer()
        self._reset_stats()
        self._means2d: list = []
        self._last_size = 1

    def _build_optimizer(self, state: dict | None = None) -> None:
        c = self.config.gaussians
        groups = [
            {"params": [getattr(self.gaussians, n)], "lr": getattr(c, attr), "name": n}
            for n, attr in _LR.items()
        ]
        bg = list(self.background.parameters())
        if bg:
            groups.append({"params": bg, "lr": self.config.lr, "name": "background"})
        self.optimizer = torch.optim.Adam(groups, eps=1e-15)
        if state is not None:
            self.optimizer.load_state_dict(state)

    def _reset_stats(self) -> None:
        n = self.gaussians.num
        self.grad_sum = torch.zeros(n, device=self.device)
        self.grad_count = torch.zeros(n, device=self.device)

    # -- the interface of the loop ---------------------------------------------------------------
    def render(self, c2w, fov_deg, size, *, background=None, generator=None, training=False,
               shading="albedo", light=None, ambient=0.3) -> dict:  # fmt: skip
        """Render views; ``background`` a colour ``[3]`` / ``[V, 3]`` or a callable of ray
        directions (environment map). Only albedo shading (Gaussians carry no normals)."""
        if shading != "albedo":
            raise ValueError("the gaussians representation renders albedo only")
        c2w = c2w.to(self.device)
        if training:
            self._last_size = size
        out = self.gaussians.render(
            c2w, fov_deg, size, None, means2d_out=self._means2d if training else None
        )
        v = c2w.shape[0]
        if background is None:
            bg = torch.ones(v, 3, 1, 1, device=self.device).expand(v, 3, size, size)
        elif callable(background) and not isinstance(background, torch.Tensor):
            from mvdiff.sds.render import camera_rays

            _, d = camera_rays(c2w, fov_deg, size)  # (V, H, W, 3)
            bg = background(d.reshape(-1, 3)).reshape(v, size, size, 3).permute(0, 3, 1, 2)
        else:
            bg = torch.as_tensor(background, dtype=torch.float32).to(self.device)
            bg = bg.reshape(-1, 3).expand(v, 3)[:, :, None, None].expand(v, 3, size, size)
        out["rgb"] = out["rgb"] + (1.0 - out["opacity"]) * bg  # premultiplied over background
        out["background"] = bg
        return out

    def prepare_ref(self, views: dict, resolution: int, indices=None) -> dict:
        """The reference views ``indices`` at ``resolution``: ``rgba`` ``[V, 4, R, R]``, ``c2w``,
        ``fov_deg``, ``background``."""
        idx = torch.arange(views["rgba"].shape[0]) if indices is None else torch.as_tensor(indices)
        rgba = views["rgba"][idx].float()
        if rgba.shape[-1] != resolution or rgba.shape[-2] != resolution:
            rgba = F.interpolate(rgba, size=(resolution, resolution), mode="area")
        return {
            "rgba": rgba,
            "c2w": views["c2w"][idx].float(),
            "fov_deg": torch.as_tensor(views["fov_deg"]).float()[idx],
            "background": views.get("background"),
        }

    def ref_loss(self, ref: dict, config) -> torch.Tensor:
        """RGB + ``ref_mask_weight`` * mask MSE on up to ``gaussians.ref_views_per_step``
        random reference views (the field's :func:`mvdiff.sds.loop.ref_view_loss` on images)."""
        gen = self.generator
        n = ref["rgba"].shape[0]
        k = min(config.gaussians.ref_views_per_step, n)
        idx = torch.randperm(n, generator=gen)[:k] if k < n else torch.arange(n)
        target = ref["rgba"][idx].to(self.device)
        size = target.shape[-1]
        fixed = ref.get("background")
        if fixed is not None:
            bg = torch.as_tensor(fixed, dtype=torch.float32).to(self.device)
        else:
            bg = self.background.sample(k, gen, training=True)
            if isinstance(bg, torch.Tensor):
                bg = bg.to(self.device)
        out = self.render(
            ref["c2w"][idx], ref["fov_deg"][idx], size, background=bg, generator=gen, training=True
        )
        a = target[:, 3:4]
        if fixed is not None:
            want = target[:, :3]
        else:
            want = target[:, :3] * a + out["background"].detach() * (1.0 - a)
        loss = F.mse_loss(out["rgb"], want)
        if config.ref_mask != "none" and config.ref_mask_weight > 0:
            loss = loss + config.ref_mask_weight * F.mse_loss(out["opacity"], a)
        return loss

    def before_step(self, step: int) -> None:
        self._means2d = []
        c, steps = self.config.gaussians, max(int(self.config.steps), 1)
        frac = min(step / steps, 1.0)
        for group in self.optimizer.param_groups:  # exponential decays
            name = group.get("name")
            if name == "means":
                group["lr"] = c.lr_means * c.lr_means_final**frac
            elif name in _LR:
                group["lr"] = getattr(c, _LR[name]) * c.lr_final**frac

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Accumulate the view-space positional gradients; densify, prune and reset opacity
        on the schedule (module docstring)."""
        c, steps, g = self.config.gaussians, max(int(self.config.steps), 1), self.gaussians
        # one [N, 2] per view (torch rasteriser) or [V, N, 2] per call (gsplat)
        grads = [
            m.grad.norm(dim=-1).reshape(-1, g.num) for m in self._means2d if m.grad is not None
        ]
        if grads:
            grads = torch.cat(grads)  # (views, N)
            # NDC units as 3DGS: pixel gradients times half the image size, times the views of
            # the step (the loss is a mean over them)
            grads = grads * (self._last_size / 2.0) * grads.shape[0]
            seen = grads > 0
            self.grad_sum += (grads * seen).sum(0)
            self.grad_count += seen.sum(0)
        self._means2d = []
        done = step + 1
        start, stop = _at(c.densify_from, steps), _at(c.densify_until, steps)
        every = max(_at(c.densify_every, steps), 1)
        if start <= done <= stop and done % every == 0 and done > start:
            mean = self.grad_sum / self.grad_count.clamp(min=1)
            counts = g.densify(mean, self.optimizer, self.generator)
            pruned = g.prune(self.optimizer)
            self._reset_stats()
            log.debug("step %d: densify %s, pruned %d -> %d Gaussians", done, counts, pruned, g.num)
        reset = _at(c.opacity_reset_every, steps)
        if reset > 0 and done % reset == 0 and done <= stop and done < steps:
            g.reset_opacity(0.01, self.optimizer)

    def mesh(self, resolution: int):
        return self.gaussians.extract_mesh(resolution)

    def export_asset(self, config, output, ref=None, ref_resolution=None) -> dict:
        """``mesh.glb`` / ``mesh.obj`` / ``mesh.ply`` of the Gaussians' density on a grid through
        the field's export (:func:`mvdiff.sds.asset.export_asset`: iso-level chosen from the
        Gaussians' own rendered opacity, floaters dropped, UV atlas and baked albedo texture,
        metrics) with :class:`GaussianGridField` as the field and the rasteriser as renderer."""
        from mvdiff.sds.asset import export_asset
        from mvdiff.sds.recon import render_fit

        field = GaussianGridField(self.gaussians, config.mesh_resolution)

        def render(c2w, fov_deg, resolution, background):
            return render_fit(self, c2w, fov_deg, resolution, background)

        return export_asset(field, config, output, ref, ref_resolution, render=render)

    def write_outputs(self, folder) -> dict:
        from mvdiff.sds.ply import save_gaussians_ply

        save_gaussians_ply(Path(folder) / "gaussians.ply", self.gaussians)
        return {"gaussians": self.gaussians.num}

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "gaussians": {k: v.detach().clone() for k, v in self.gaussians.state_dict().items()},
            "background": self.background.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "grad_sum": self.grad_sum,
            "grad_count": self.grad_count,
        }

    def check_state(self, state: dict) -> str | None:
        """What is wrong with the parts of a checkpoint only Gaussians have, or None."""
        means = state["gaussians"].get("means")
        if means is None or means.ndim != 2 or means.shape[1] != 3:
            return "gaussians.means must be [N, 3]"
        for key in ("grad_sum", "grad_count"):
            t = state.get(key)
            if not (isinstance(t, torch.Tensor) and t.shape == (means.shape[0],)):
                return f"{key} must be a tensor of {means.shape[0]} values"
            if not t.isfinite().all():
                return f"{key} is not finite"
        return None

    def load_state_dict(self, state: dict) -> None:
        n = state["gaussians"]["means"].shape[0]
        self.gaussians = GaussianModel(self.config.gaussians, num=n).to(self.device)
        self.gaussians.load_state_dict(state["gaussians"])
        self.background.load_state_dict(state.get("background", {}))
        self._build_optimizer(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.grad_sum, self.grad_count = state["grad_sum"], state["grad_count"]
