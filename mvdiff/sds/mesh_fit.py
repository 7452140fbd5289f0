"""The coarse-to-fine (Magic3D-style) refinement stage: an explicit textured mesh optimised
with the same losses as the field (multi-view SDS and/or the reference views).

:class:`MeshFitState` is a representation for the shared loop of :mod:`mvdiff.sds.loop`
(render, prepare_ref, ref_loss, regularizer, state_dict, ...): a base mesh (the extracted
mesh of the field stage, or any mesh, :func:`load_base_mesh`) with a learnable offset per
vertex and a learnable albedo: its UV texture plus a residual colour field (dense 3D grids
at 32³ and 64³ over the field's cube, so one pixel's gradient reaches the surface around it
whatever the atlas's charts; baked into the texture at export),
rendered by the differentiable rasteriser of :mod:`mvdiff.sds.mesh_raster` at a higher
resolution than the field stage (the reference views' own). A uniform Laplacian and a
normal-consistency term keep the surface clean.

:func:`refine` runs the stage into an output folder: ``refine_checkpoint.pt`` (every
``save_every`` steps and at the end; ``resume`` continues), ``refined.glb`` (UV-textured),
``refined.obj`` + ``refined.mtl`` + ``refined_albedo.png``, ``refined.ply`` (vertex colours),
``refined_views.png``, and returns the stage's summary: metrics of the mesh it started from
and of the refined one (PSNR, silhouette IoU, Chamfer with ``ref_mesh``), counts and seconds.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mvdiff.config import validate_config
from mvdiff.errors import UserError

__all__ = ["MeshFitState", "RefineConfig", "load_base_mesh", "refine"]

log = logging.getLogger(__name__)


@dataclass
class RefineConfig:
    #: run the mesh stage after the field stage (``--refine``)
    enabled: bool = False
    #: refine this mesh instead of a field's (``--refine-from``; in the run's frame, z up
    #: after the +Y-up file convention, e.g. a previous run's mesh.glb)
    from_mesh: str | None = None
    steps: int = 300
    #: render size (0: the reference views' own size, at most 512; without them
    #: ``render_size_late``)
    render_size: int = 0
    #: views rendered per step (reference views drawn at random)
    views: int = 4
    lr_geometry: float = 0.001
    #: of the residual colour grids (0.02 overshot: held-out PSNR 0.2-0.8 dB lower on the
    #: bundled assets at 20 steps)
    lr_texture: float = 0.01
    #: uniform Laplacian (in units of the mean edge length) and normal consistency weights
    laplacian_weight: float = 0.5
    normal_weight: float = 0.05
    #: soft silhouette width in pixels (:mod:`mvdiff.sds.mesh_raster`); a sigmoid of scale
    #: 0.25 px spreads an edge over about a pixel, as a box-filtered pixel does (0.5 blurred
    #: the edges twice over with the pixel filter)
    sigma: float = 0.25
    #: the camera's pixel filter: a Gaussian of this standard deviation in pixels of the
    #: reference views blurs every render, at any size (0: none). Blender's default filter
    #: (Blackman-Harris, 1.5 px wide) has a standard deviation of 0.21 px; with the denoiser
    #: 0.4 fits the bundled assets' renders best (held-out PSNR of the extracted mesh and
    #: after refining; 1.0 cost the capsule 2 dB, its edges blurred)
    pixel_filter: float = 0.4
    #: a mesh without a UV atlas is decimated to about this many faces first
    faces: int = 20000
    #: "auto" (nvdiffrast's visibility pass on CUDA when installed), "torch", "nvdiffrast"
    backend: str = "auto"

    def validate(self) -> None:
        """The hook of :func:`mvdiff.config.validate_config`."""
        if self.steps < 0:
            raise ValueError(f"refine.steps must be >= 0, got {self.steps}")
        if self.render_size < 0 or self.views < 1:
            raise ValueError("refine.render_size must be >= 0 and refine.views >= 1")
        if min(self.lr_geometry, self.lr_texture, self.laplacian_weight, self.normal_weight) < 0:
            raise ValueError("refine learning rates and weights must be >= 0")
        if self.pixel_filter < 0:
            raise ValueError(f"refine.pixel_filter must be >= 0, got {self.pixel_filter}")
        if self.sigma <= 0:
            raise ValueError(f"refine.sigma must be > 0, got {self.sigma}")
        if self.backend not in ("auto", "torch", "nvdiffrast"):
            raise ValueError(
                f"refine.backend must be auto, torch or nvdiffrast, got {self.backend!r}"
            )


def _weld(verts: np.ndarray, faces: np.ndarray):
    """(unique positions ``[N, 3]``, their index per input vertex ``[N']``, faces on them)."""
    geom, vmap = np.unique(np.asarray(verts, np.float32), axis=0, return_inverse=True)
    vmap = vmap.reshape(-1)
    return geom, vmap, vmap[np.asarray(faces)]


def _bake_vertex_colors(tv, tf, uv, colors, size: int) -> np.ndarray:
    """Texture ``[size, size, 3]`` float of per-vertex colours interpolated over the atlas."""
    from mvdiff.sds.raster import rasterize

    pix = np.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], -1)  # (N, 2) x right, y down
    tri_id, bary = rasterize(torch.from_numpy(pix), torch.from_numpy(tf), size, size)
    tri_id, bary = tri_id.reshape(-1), bary.reshape(-1, 3)  # (S, S) -> (S*S,), (S*S, 3)
    cols = torch.as_tensor(np.asarray(colors, np.float32))[torch.from_numpy(tf)]  # (M, 3, 3)
    img = torch.full((size * size, 3), float(np.mean(colors)) if len(colors) else 0.5)
    hit = tri_id >= 0
    img[hit] = (bary[hit, :, None] * cols[tri_id[hit]]).sum(1)  # (K, 3, 3) -> (K, 3)
    return img.reshape(size, size, 3).numpy()  # (S*S, 3) -> (S, S, 3)


def load_base_mesh(path, texture_size: int = 1024, faces: int = 20000) -> dict:
    """The mesh to refine from a file (.glb/.gltf/.obj: +Y up; .ply/.stl: +Z up) as arrays:
    ``verts`` ``[N, 3]`` (z up, welded), ``faces`` ``[M, 3]`` on them, ``vmap`` ``[N']`` (the
    welded vertex of each atlas vertex), ``uv_faces`` ``[M, 3]``, ``uv`` ``[N', 2]`` and
    ``texture`` ``[T, T, 3]`` in [0, 1]. A mesh with a UV texture keeps both; otherwise it is
    decimated to about ``faces`` faces, given an atlas (xatlas) and its vertex (or material)
    colours baked into a ``texture_size`` texture."""
    import trimesh

    from mvdiff.sds.mesh import decimate, uv_atlas
    from mvdiff.sds.mesh_eval import _Y_UP, _Z_UP

    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UserError(f"--refine-from {path}: no such file")
    if suffix not in _Y_UP | _Z_UP | {".gltf"}:
        raise UserError(f"--refine-from {path}: must be .glb, .gltf, .obj, .ply or .stl")
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as e:  # trimesh raises many kinds on broken files
        raise UserError(f"--refine-from {path}: not a readable mesh ({e})") from None
    v = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))), dtype=np.float32)
    f = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64)
    if len(v) == 0 or len(f) == 0:
        raise UserError(f"--refine-from {path}: no triangles")
    if suffix in _Y_UP | {".gltf"}:
        v = np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1)  # y up -> z up
    visual = mesh.visual
    image = getattr(getattr(visual, "material", None), "baseColorTexture", None)
    image = (
        image if image is not None else getattr(getattr(visual, "material", None), "image", None)
    )
    uv = getattr(visual, "uv", None)
    if getattr(visual, "kind", None) == "texture" and uv is not None and image is not None:
        tex = np.asarray(image.convert("RGB"), np.float32) / 255.0
        geom, vmap, gf = _weld(v, f)
        return {"verts": geom, "faces": gf, "vmap": vmap, "uv_faces": f,
                "uv": np.asarray(uv, np.float32), "texture": tex}  # fmt: skip
    try:
        colored = visual if getattr(visual, "kind", None) == "vertex" else visual.to_color()
        colors = np.asarray(colored.vertex_colors, np.float32)[:, :3] / 255.0
    except Exception:  # no usable colour: mid grey
        colors = np.full((len(v), 3), 0.5, np.float32)
    if len(colors) != len(v):
        colors = np.full((len(v), 3), 0.5, np.float32)
    geom, vmap, gf = _weld(v, f)
    gcol = np.zeros((len(geom), 3), np.float32)
    gcol[vmap] = colors
    if faces and len(gf) > faces:
        dv, df = decimate(geom, gf, faces)
        gcol, geom, gf = _vertex_colors_of(geom, gcol, dv), dv, df
    tv, tf, tuv = uv_atlas(geom, gf, texture_size)
    tex = _bake_vertex_colors(tv, tf, tuv, _vertex_colors_of(geom, gcol, tv), texture_size)
    geom, vmap, gf = _weld(tv, tf)
    return {"verts": geom, "faces": gf, "vmap": vmap, "uv_faces": tf, "uv": tuv, "texture": tex}


def _vertex_colors_of(geom, gcol, tv):
    """Colours ``[N', 3]`` of atlas vertices ``tv`` (copies of ``geom`` rows)."""
    from scipy.spatial import cKDTree

    _, idx = cKDTree(np.asarray(geom)).query(np.asarray(tv))
    return gcol[idx]


#: the arrays of a base mesh (:func:`load_base_mesh`), kept in the checkpoint
BASE_KEYS = ("verts", "faces", "vmap", "uv_faces", "uv", "texture")
#: resolutions of the residual colour grids
COLOR_GRIDS = (32, 64)
#: half-extent of the cube the colour grids cover (the field's)
COLOR_BOUND = 0.6


class MeshFitState:
    """A base mesh with learnable vertex offsets and albedo texture, its background, Adam and
    generator, for :func:`mvdiff.sds.loop.run_steps` (the interface of
    :class:`mvdiff.sds.loop.FitState`). ``base``: arrays or tensors of :data:`BASE_KEYS`."""

    config_keys = ("background",)
    checkpoint_parts = ("mesh", "background")

    def __init__(self, config, base: dict, device="cpu"):
        from mvdiff.sds.background import Background
        from mvdiff.sds.mesh_raster import edge_topology, nvdiffrast_available

        validate_config(config.refine, "refine")
        self.config, self.device = config, torch.device(device)
        rc = config.refine
        t = {k: torch.as_tensor(np.asarray(base[k]) if not isinstance(base[k], torch.Tensor)
                                else base[k]) for k in BASE_KEYS}  # fmt: skip
        self.verts = t["verts"].float().to(self.device)  # (N, 3)
        self.faces = t["faces"].long().to(self.device)  # (M, 3)
        self.vmap = t["vmap"].long().to(self.device)  # (N',)
        self.uv_faces = t["uv_faces"].long().to(self.device)  # (M, 3)
        self.uv = t["uv"].float().to(self.device)  # (N', 2)
        tex = t["texture"].float().clamp(0, 1).to(self.device)  # (T, T, 3)
        self.base_texture = tex.permute(2, 0, 1)[None].contiguous()  # (T, T, 3) -> (1, 3, T, T)
        self.offsets = torch.nn.Parameter(torch.zeros_like(self.verts))
        self.levels = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(1, 3, r, r, r, device=self.device)) for r in COLOR_GRIDS
        )
        with torch.random.fork_rng(devices=[]):  # initial weights from config.seed only
            torch.default_generator.manual_seed(config.seed)  # CPU only: CUDA untouched
            self.background = Background(config.background).to(self.device)
        groups = [
            {"params": [self.offsets], "lr": rc.lr_geometry},
            {"params": list(self.levels), "lr": rc.lr_texture},
        ]
        if len(list(self.background.parameters())):
            groups.append({"params": list(self.background.parameters()), "lr": config.lr})
        self.optimizer = torch.optim.Adam(groups)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.topo = edge_topology(self.uv_faces)
        backend = rc.backend
        if backend == "auto":
            backend = "nvdiffrast" if nvdiffrast_available(self.device) else "torch"
        if backend == "nvdiffrast" and not nvdiffrast_available(self.device):
            raise UserError("refine.backend nvdiffrast: needs CUDA and the nvdiffrast package")
        self.backend, self._ctx = backend, None
        #: the size the pixel filter is given in (the reference views'; set by :func:`refine`)
        self.filter_size = None
        self._regular = _regular_terms(self.verts, self.faces)

    # geometry and texture of the current state
    def positions(self) -> torch.Tensor:
        """Welded vertex positions ``[N, 3]``."""
        return self.verts + self.offsets

    def residual(self, points: torch.Tensor) -> torch.Tensor:
        """The learnt colour correction ``[P, 3]`` at surface points ``[P, 3]``."""
        g = (points / COLOR_BOUND).reshape(1, 1, 1, -1, 3)  # (P, 3) -> (1, 1, 1, P, 3)
        out = 0.0
        for lv in self.levels:  # (1, 3, R, R, R): x -> W, y -> H, z -> D
            out = out + F.grid_sample(lv, g, mode="bilinear", padding_mode="border",
                                      align_corners=True)  # fmt: skip  # (1, 3, 1, 1, P)
        return out.reshape(3, -1).T if torch.is_tensor(out) else torch.zeros_like(points)

    @torch.no_grad()
    def texture(self) -> torch.Tensor:
        """The albedo baked into the atlas ``[1, 3, T, T]``: the base texture plus the residual
        colour at each covered texel's surface point."""
        from mvdiff.sds.raster import rasterize

        size = self.base_texture.shape[-1]
        uv = self.uv.cpu().double()
        pix = torch.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], -1)  # (N', 2) y down
        tri_id, bary = rasterize(pix, self.uv_faces.cpu(), size, size)
        tri_id, bary = tri_id.reshape(-1), bary.reshape(-1, 3)  # (T, T) -> (T*T,), (T*T, 3)
        hit = (tri_id >= 0).nonzero().squeeze(1)
        corners = self.positions()[self.vmap][self.uv_faces].cpu()  # (M, 3, 3)
        pts = (bary[hit, :, None] * corners[tri_id[hit]]).sum(1)  # (K, 3, 3) -> (K, 3)
        tex = self.base_texture[0].reshape(3, -1).clone()  # (1, 3, T, T) -> (3, T*T)
        tex[:, hit.to(tex.device)] += self.residual(pts.to(self.device)).T
        return tex.reshape(1, 3, size, size)  # (3, T*T) -> (1, 3, T, T)

    def render(self, c2w, fov_deg, size, *, background=None, generator=None, training=False,
               shading="albedo", light=None, ambient=0.3) -> dict:  # fmt: skip
        from mvdiff.sds.mesh_raster import render_mesh

        if self.backend == "nvdiffrast" and self._ctx is None:
            import nvdiffrast.torch as dr

            self._ctx = dr.RasterizeCudaContext(device=self.device)
        pos = self.positions()[self.vmap]  # (N, 3) -> (N', 3) atlas vertices
        out = render_mesh(
            pos, self.uv_faces, self.uv, self.base_texture, c2w.to(self.device), fov_deg, size,
            background=background, color_fn=self.residual, sigma=self.config.refine.sigma, backend=self.backend,
            shading=shading, light=light, ambient=ambient, ctx=self._ctx, topo=self.topo,
        )  # fmt: skip
        std = self.config.refine.pixel_filter * size / (self.filter_size or size)
        if std > 0:
            out = {k: _gaussian_blur(x, std) for k, x in out.items()}
        return out

    def prepare_ref(self, views: dict, resolution: int, indices=None) -> dict:
        idx = list(range(views["rgba"].shape[0])) if indices is None else list(indices)
        rgba = F.interpolate(views["rgba"][idx].float(), size=(resolution, resolution),
                             mode="area")  # fmt: skip  # (V, 4, H, W) -> (V, 4, R, R)
        fov = torch.as_tensor(views["fov_deg"], dtype=torch.float32).reshape(-1)
        fov = fov.expand(views["rgba"].shape[0])[idx]  # (V,)
        return {"rgba": rgba, "c2w": views["c2w"][idx].float(), "fov_deg": fov,
                "background": views.get("background"), "resolution": resolution}  # fmt: skip

    def ref_loss(self, rays: dict, config) -> torch.Tensor:
        """RGB + ``ref_mask_weight`` * mask MSE on ``refine.views`` random reference views."""
        from mvdiff.sds.ref_views import composite

        gen = self.generator
        n = rays["rgba"].shape[0]
        idx = torch.randperm(n, generator=gen)[: min(config.refine.views, n)]
        target = rays["rgba"][idx].to(self.device)  # (K, 4, R, R)
        fixed = rays.get("background")
        if fixed is not None:
            bg = torch.as_tensor(fixed, dtype=torch.float32).to(self.device)
        else:
            bg = self.background.sample(len(idx), gen, training=True)
            if isinstance(bg, torch.Tensor):
                bg = bg.to(self.device)
        out = self.render(rays["c2w"][idx], rays["fov_deg"][idx], rays["resolution"],
                          background=bg)  # fmt: skip
        a = target[:, 3:4]
        if fixed is not None:
            want = target[:, :3]
        elif callable(bg) and not isinstance(bg, torch.Tensor):
            want = composite(target, torch.ones(3, device=self.device))  # env: approximate
        else:
            want = composite(target, bg)
        loss = F.mse_loss(out["rgb"], want)
        if config.ref_mask != "none" and config.ref_mask_weight > 0:
            loss = loss + config.ref_mask_weight * F.mse_loss(out["opacity"], a)
        return loss

    def regularizer(self) -> torch.Tensor:
        """Laplacian (uniform, in units of the initial mean edge length) + normal consistency."""
        rc = self.config.refine
        x = self.positions()
        r = self._regular
        loss = torch.zeros((), device=self.device)
        if rc.laplacian_weight > 0:
            nb = torch.zeros_like(x).index_add_(0, r["i"], x[r["j"]])  # (N, 3) neighbour sums
            lap = nb / r["deg"][:, None] - x
            loss = loss + rc.laplacian_weight * (lap**2).sum(-1).mean() / r["h2"]
        if rc.normal_weight > 0 and r["adj"].numel():
            tri = x[self.faces]  # (M, 3, 3)
            n = F.normalize(torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1),
                            dim=-1)  # fmt: skip
            cos = (n[r["adj"][:, 0]] * n[r["adj"][:, 1]]).sum(-1)
            loss = loss + rc.normal_weight * (1.0 - cos).mean()
        return loss

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        mesh = {k: getattr(self, k) for k in ("verts", "faces", "vmap", "uv_faces", "uv")}
        mesh["texture"] = self.base_texture[0].permute(1, 2, 0)  # (1, 3, T, T) -> (T, T, 3)
        mesh["offsets"] = self.offsets.detach()
        for i, lv in enumerate(self.levels):
            mesh[f"level{i}"] = lv.detach()
        return {
            "mesh": {k: v.detach().cpu() for k, v in mesh.items()},
            "background": self.background.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def check_state(self, state: dict) -> str | None:
        mesh = state["mesh"]
        want = {"offsets": tuple(self.offsets.shape)}
        want.update({f"level{i}": tuple(lv.shape) for i, lv in enumerate(self.levels)})
        for k, shape in want.items():
            if k not in mesh or tuple(mesh[k].shape) != shape:
                return f"mesh.{k} must be {shape}"
        return None

    def load_state_dict(self, state: dict) -> None:
        mesh = state["mesh"]
        with torch.no_grad():
            self.offsets.copy_(mesh["offsets"].to(self.device))
            for i, lv in enumerate(self.levels):
                lv.copy_(mesh[f"level{i}"].to(self.device))
        self.background.load_state_dict(state.get("background", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu())

    # results
    @torch.no_grad()
    def arrays(self):
        """(atlas vertices ``[N', 3]``, faces ``[M, 3]``, uv ``[N', 2]``, texture ``[T, T, 3]``
        uint8; welded vertices ``[N, 3]``, faces on them) as numpy."""
        x = self.positions()
        tex = (
            self.texture()[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        )  # (1, 3, T, T) -> (T, T, 3)
        return (x[self.vmap].cpu().numpy(), self.uv_faces.cpu().numpy(), self.uv.cpu().numpy(),
                (tex * 255 + 0.5).astype(np.uint8), x.cpu().numpy(),
                self.faces.cpu().numpy())  # fmt: skip

    @torch.no_grad()
    def evaluate(self, config, ref: dict | None, res: int, supersample: int = 2) -> dict:
        """PSNR (train / held out; renders at ``supersample`` times ``res`` averaged down, an
        antialiased image as the references are) and silhouette IoU (the hard mesh
        silhouettes, as the field stage's mesh) against the reference views at ``res``;
        Chamfer with ``ref_mesh``."""
        from mvdiff.sds.asset import _r
        from mvdiff.sds.mesh_eval import (
            chamfer_distance,
            load_source_mesh,
            mesh_silhouette_iou,
            shard_normalization,
        )
        from mvdiff.sds.recon import psnr
        from mvdiff.sds.ref_views import composite

        _, _, _, _, verts, faces = self.arrays()
        metrics = {}
        if ref is not None:
            bg = torch.tensor(config.background.color, dtype=torch.float32)
            if ref.get("background") is not None:
                bg = torch.as_tensor(ref["background"], dtype=torch.float32)
            c2w = ref["c2w"].float()
            fov = torch.as_tensor(ref["fov_deg"], dtype=torch.float32).reshape(-1).expand(len(c2w))
            ss = max(int(supersample), 1)
            renders = torch.cat([
                F.avg_pool2d(self.render(c2w[i : i + 1], fov[i : i + 1], res * ss,
                                         background=bg)["rgb"].cpu(), ss)
                for i in range(len(c2w))
            ])  # fmt: skip  # V x (1, 3, R, R) -> (V, 3, R, R)
            rgba = F.interpolate(ref["rgba"].float(), size=(res, res), mode="area")
            targets, alpha = composite(rgba, bg), rgba[:, 3:]
            holdout = sorted(set(config.ref_holdout))
            train = [i for i in range(len(c2w)) if i not in holdout]
            metrics["psnr_train"] = _r(psnr(renders[train], targets[train]), 2)
            metrics["mesh_iou_ref"] = _r(mesh_silhouette_iou(verts, faces, c2w, fov, alpha))
            if holdout:
                metrics["psnr_holdout"] = _r(psnr(renders[holdout], targets[holdout]), 2)
                metrics["mesh_iou_ref_holdout"] = _r(
                    mesh_silhouette_iou(verts, faces, c2w[holdout], fov[holdout], alpha[holdout])
                )
        if config.ref_mesh:
            norm = (shard_normalization(config.ref_views, config.ref_uid)
                    if config.ref_views else None)  # fmt: skip
            sv, sf = load_source_mesh(config.ref_mesh, norm)
            metrics["chamfer"] = _r(chamfer_distance(verts, faces, sv, sf), 5)
        return metrics

    def write_outputs(self, output, name: str = "refined") -> dict:
        """``NAME.glb`` (UV texture inside), ``NAME.obj`` + ``.mtl`` + ``NAME_albedo.png`` and
        ``NAME.ply`` (vertex colours); returns the mesh's counts."""
        from mvdiff.sds.mesh import export_mesh, textured_trimesh

        tv, tf, uv, tex, verts, faces = self.arrays()
        mesh = textured_trimesh(tv, tf, uv, tex, name=f"{name}_albedo")
        for ext in ("glb", "obj", "ply"):
            export_mesh(mesh, Path(output) / f"{name}.{ext}")
        return {"vertices": int(len(tv)), "faces": int(len(tf)), "texture": "uv",
                "texture_size": int(tex.shape[0]), "welded_vertices": int(len(verts))}  # fmt: skip


def _gaussian_blur(x: torch.Tensor, std: float) -> torch.Tensor:
    """Images ``[V, C, H, W]`` blurred by a separable Gaussian (edges replicated)."""
    r = max(int(np.ceil(3 * std)), 1)
    k = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(k**2) / (2 * std * std))
    g = g / g.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, g.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # along W
    return F.conv2d(x, g.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # along H


def _regular_terms(verts: torch.Tensor, faces: torch.Tensor) -> dict:
    """Neighbour lists (both directions of every edge), degrees, the squared mean edge length
    and adjacent face pairs (faces sharing an edge, two per edge) of a welded mesh."""
    from mvdiff.sds.mesh_raster import edge_topology

    topo = edge_topology(faces)
    e = topo["edges"]  # (E, 2)
    i = torch.cat([e[:, 0], e[:, 1]])
    j = torch.cat([e[:, 1], e[:, 0]])
    deg = torch.zeros(len(verts), device=verts.device).index_add_(
        0, i, torch.ones_like(i, dtype=torch.float32)
    )
    h2 = float(((verts[e[:, 0]] - verts[e[:, 1]]) ** 2).sum(-1).mean()) if len(e) else 1.0
    # face pairs across each edge used by exactly two faces
    fe = topo["face_edges"].reshape(-1)  # (M, 3) -> (3M,)
    face_of = torch.arange(len(faces), device=verts.device).repeat_interleave(3)
    order = torch.argsort(fe, stable=True)
    face_s = face_of[order]
    count = torch.bincount(fe, minlength=len(e))
    start = torch.cumsum(count, 0) - count
    two = (count == 2).nonzero().squeeze(1)
    adj = torch.stack([face_s[start[two]], face_s[start[two] + 1]], -1)  # (A, 2)
    return {"i": i, "j": j, "deg": deg.clamp(min=1), "h2": max(h2, 1e-12), "adj": adj}


def _base_from_checkpoint(state: dict, path) -> dict:
    mesh = state.get("mesh")
    if not isinstance(mesh, dict) or not all(
        isinstance(mesh.get(k), torch.Tensor) for k in BASE_KEYS
    ):
        raise UserError(f"--resume {path}: not a refine checkpoint (mesh lacks {list(BASE_KEYS)})")
    return {k: mesh[k] for k in BASE_KEYS}


def refine(config, output, *, mesh_path=None, ref: dict | None = None, res: int | None = None,
           sds=None, resume: bool = False, progress: bool = True, device="cpu", log=log.info) -> dict:  # fmt: skip
    """Run the mesh stage (module docstring) on ``mesh_path`` (or the base mesh kept in
    ``OUTPUT/refine_checkpoint.pt`` when resuming), with the SDS term ``sds``
    (:class:`mvdiff.sds.text_to_3d.SDSTerm`) and/or the reference views ``ref``; metrics at
    ``res`` (the field stage's). Returns the stage's summary."""
    from mvdiff.sds.loop import fit_with_checkpoints, load_checkpoint, restore

    output = Path(output)
    rc = config.refine
    ckpt = output / "refine_checkpoint.pt"
    t0 = time.time()
    state = None
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt, device)
        base = _base_from_checkpoint(state, ckpt)
    else:
        base = load_base_mesh(mesh_path, config.texture_size, rc.faces)
    fit = MeshFitState(config, base, device)
    if ref is not None:
        native = int(ref["rgba"].shape[-1])
        size = rc.render_size or min(native, 512)
        res = int(res or native)
    else:
        size = rc.render_size or config.render_size_late
    if ref is not None:
        fit.filter_size = native
    metrics_mesh = fit.evaluate(config, ref, res)  # the mesh as it came (offsets 0)
    start = 0
    if state is not None:
        start = restore(fit, state, ckpt)
        log(f"resumed the mesh stage from {ckpt} at step {start}")
    rays = None
    if ref is not None:
        train = [i for i in range(ref["rgba"].shape[0]) if i not in set(config.ref_holdout)]
        rays = fit.prepare_ref(ref, size, train)
    loop_config = copy.deepcopy(config)
    loop_config.steps, loop_config.hires_after = rc.steps, 0
    loop_config.render_size = loop_config.render_size_late = size
    log(f"mesh stage: {len(fit.faces)} faces, texture {fit.base_texture.shape[-1]}², "
        f"{size}² renders ({fit.backend}), {rc.steps} steps")  # fmt: skip
    t1 = time.time()
    fit_with_checkpoints(
        fit, loop_config, ckpt, start, start if state is not None else None, sds=sds, rays=rays,
        progress=progress, desc="refine",
    )  # fmt: skip
    fit_seconds = round(time.time() - t1, 2)
    t1 = time.time()
    metrics = fit.evaluate(config, ref, res)
    eval_seconds = round(time.time() - t1, 2)
    t1 = time.time()
    info = fit.write_outputs(output)
    _write_views(fit, config, output / "refined_views.png")
    seconds = {"refine_fit": fit_seconds, "refine_metrics": eval_seconds,
               "refine_write": round(time.time() - t1, 2)}  # fmt: skip
    logging.getLogger(__name__).info("refined mesh %s; metrics %s", info, metrics)
    return {"steps": rc.steps, "resumed_from": start, "render_size": size,
            "backend": fit.backend, "mesh": info, "metrics_mesh": metrics_mesh,
            "metrics": metrics, "seconds": seconds,
            "total_seconds": round(time.time() - t0, 2)}  # fmt: skip


@torch.no_grad()
def _write_views(fit: MeshFitState, config, path) -> None:
    """Four orbit views of the refined mesh side by side (as the field stage's views.png)."""
    from PIL import Image

    from mvdiff.cameras import orbit_c2w
    from mvdiff.io import save_image
    from mvdiff.sds.text_to_3d import _to_uint8, framing_distance

    dist = framing_distance(40.0)
    c2w = torch.from_numpy(orbit_c2w(np.full(4, 15.0), np.arange(4) * 90.0, dist)).float()
    bg = torch.tensor(config.background.color, dtype=torch.float32)
    size = config.render_size_late
    views = _to_uint8(torch.cat([fit.render(c[None], 40.0, size, background=bg)["rgb"].cpu()
                                 for c in c2w]))  # fmt: skip
    save_image(path, Image.fromarray(np.concatenate(list(views), 1)))
