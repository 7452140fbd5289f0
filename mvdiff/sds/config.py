"""The text-to-3D / reconstruction config (every number of docs/design.md §6 is a value here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from mvdiff.sds.background import BackgroundConfig
from mvdiff.sds.field import FieldConfig
from mvdiff.sds.gaussians import GaussianConfig
from mvdiff.sds.guidance import SDSConfig
from mvdiff.sds.mesh_fit import RefineConfig
from mvdiff.shards import CAPTION_SUFFIX

__all__ = ["TextTo3DConfig"]


@dataclass
class TextTo3DConfig:
    prompt: str = ""
    negative_prompt: str = ""
    prompt_suffix: str = CAPTION_SUFFIX
    steps: int = 10000
    render_size: int = 64
    #: render size after ``hires_after`` steps (docs/design.md §6: 64² first, 256² later)
    render_size_late: int = 256
    hires_after: int = 5000
    samples: int = 64
    lr: float = 0.01
    #: fused Adam (one kernel per dense grid; the same update, 3-4x faster steps on a CPU)
    fused_adam: bool = True
    seed: int = 0
    occupancy_every: int = 16
    #: field training renders composite only the samples the occupancy grid keeps, packed ray
    #: by ray (:func:`mvdiff.sds.render.render_rays`); False: the dense [rays, samples] path
    #: of before (benchmarks/bench_sds.py times both in one run)
    render_packed: bool = True
    mesh_resolution: int = 128
    #: iso-level (a density) of the mesh; None: the level whose silhouettes reproduce the
    #: field's rendered opacity (at the reference cameras, or 16 orbit cameras)
    mesh_level: float | None = None
    #: mesh pieces smaller (by volume) than this fraction of the largest are dropped
    mesh_min_component: float = 0.05
    #: decimate the marched mesh to about this many faces before UV mapping (0: keep all)
    mesh_faces: int = 20000
    #: "uv": UV atlas (xatlas) + baked albedo texture; "vertex": per-vertex colours
    mesh_texture: Literal["uv", "vertex"] = "uv"
    texture_size: int = 1024
    turntable_frames: int = 36
    #: shading of the SDS renders: "albedo" (none), "lambertian", "textureless" or "random"
    #: (one of the three per step with ``shading_probs``); normals from the density gradient
    shading: Literal["albedo", "lambertian", "textureless", "random"] = "albedo"
    shading_probs: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.25, 0.25])
    #: steps of albedo-only renders before shading starts (geometry is a blob at first)
    shading_after: int = 0
    ambient: float = 0.3
    #: posed reference views: a multi-view shard (first sample or ``ref_uid``) or the output
    #: folder of ``mvdiff sample`` (view_XX.png + cameras.json)
    ref_views: str | None = None
    ref_uid: str | None = None
    ref_weight: float = 1.0
    ref_mask_weight: float = 0.5
    #: "auto": the alpha channel, or for RGB views (``mvdiff sample``) a mask estimated from
    #: the background colour; "none": no mask loss
    ref_mask: Literal["auto", "none"] = "auto"
    #: random rays per step drawn from all reference views (0 = every ray of every view)
    ref_rays: int = 4096
    #: resolution the reference views are fitted at (None: theirs, at most render_size_late)
    ref_resolution: int | None = None
    #: field of view for views whose cameras.json has none (``mvdiff sample``); the camera
    #: distance then frames the unit box as in training: (sqrt(3)/2) / sin(fov/2)
    ref_fov_deg: float = 40.0
    #: reference views left out of the fit and scored (held-out PSNR / IoU in summary.json)
    ref_holdout: list[int] = dataclasses.field(default_factory=list)
    #: the asset the reference shard was rendered from: Chamfer distance in summary.json
    ref_mesh: str | None = None
    sds_weight: float = 1.0
    #: the SDS camera groups (:func:`mvdiff.cameras.sample_sds_group`): one elevation and one
    #: fov per group drawn from these ranges (degrees; MVDream's training ranges) ...
    sds_elevation_range: list[float] = dataclasses.field(default_factory=lambda: [0.0, 30.0])
    sds_fov_range: list[float] = dataclasses.field(default_factory=lambda: [15.0, 60.0])
    #: ... and a distance: "framing" draws a factor of the framing distance
    #: (sqrt(3)/2) / sin(fov/2); "relative" draws threestudio's relative radius r, distance
    #: r / tan(fov/2) (half the frame's height at the origin, unit-box units)
    sds_distance_mode: Literal["framing", "relative"] = "framing"
    sds_distance_range: list[float] = dataclasses.field(default_factory=lambda: [0.9, 1.1])
    save_every: int = 1000
    #: the 3D representation: a radiance field (:mod:`mvdiff.sds.field`) or 3D Gaussians
    #: (:mod:`mvdiff.sds.gaussians`, albedo shading only)
    representation: Literal["field", "gaussians"] = "field"
    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
    gaussians: GaussianConfig = dataclasses.field(default_factory=GaussianConfig)
    sds: SDSConfig = dataclasses.field(default_factory=SDSConfig)
    background: BackgroundConfig = dataclasses.field(default_factory=BackgroundConfig)
    #: the coarse-to-fine mesh stage (``--refine`` / ``--refine-from``, :mod:`mvdiff.sds.mesh_fit`)
    refine: RefineConfig = dataclasses.field(default_factory=RefineConfig)

    @classmethod
    def fast(cls, **kw) -> TextTo3DConfig:
        """A CPU-friendly preset: small grids, 32² renders, few samples."""
        base = dict(
            steps=600, render_size=32, render_size_late=64, hires_after=400, samples=32,
            mesh_resolution=64, turntable_frames=12, field=FieldConfig(resolutions=[16, 32, 64]),
            texture_size=512,
            sds=SDSConfig(anneal_steps=600), ref_rays=2048,
        )  # fmt: skip
        base.update(kw)
        return cls(**base)

    @classmethod
    def reconstruction(cls, **kw) -> TextTo3DConfig:
        """Plain posed-view reconstruction (no prior) on a CPU: a higher learning rate and
        random ray batches (Gaussians: faster learning-rate and densification schedules);
        the preset of :func:`mvdiff.sds.recon.reconstruct_from_views`."""
        base = dict(
            steps=300, lr=0.05, samples=32, sds_weight=0.0, occupancy_every=10,
            render_size=64, render_size_late=64, mesh_resolution=64, turntable_frames=12,
            texture_size=512,
            field=FieldConfig(resolutions=[12, 24, 48]), ref_rays=4096,
            gaussians=GaussianConfig(
                # tuned for a short CPU budget (benchmarks/bench_sds.py): 4x the learning
                # rates, all decaying to a tenth, no opacity reset, densify every 15% of the run
                num_init=1500, lr_means=0.008, lr_sh=0.08, lr_opacity=0.2, lr_scales=0.04,
                lr_quats=0.02, lr_final=0.1, opacity_reset_every=0.0, densify_every=0.15,
            ),
        )  # fmt: skip
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TextTo3DConfig:
        d = dict(d)
        d["field"] = FieldConfig(**d.get("field", {}))
        d["gaussians"] = GaussianConfig(**d.get("gaussians", {}))
        d["sds"] = SDSConfig(**d.get("sds", {}))
        d["background"] = BackgroundConfig(**d.get("background", {}))
        d["refine"] = RefineConfig(**d.get("refine", {}))
        return cls(**d)

    def validate(self) -> None:
        """What the field types cannot say (the hook of :func:`mvdiff.config.validate_config`,
        which checks the ``Literal`` choices first); raise ``ValueError`` naming the value."""
        if (
            len(self.shading_probs) != 3
            or min(self.shading_probs) < 0
            or sum(self.shading_probs) <= 0
        ):
            raise ValueError(
                f"shading_probs must be 3 non-negative weights, got {self.shading_probs}"
            )
        for name, lo, hi in (("sds_elevation_range", -89.0, 89.0), ("sds_fov_range", 1.0, 179.0),
                             ("sds_distance_range", 1e-3, 1e3)):  # fmt: skip
            r = getattr(self, name)
            if len(r) != 2 or not lo <= r[0] <= r[1] <= hi:
                raise ValueError(f"{name} must be [low, high] within [{lo:g}, {hi:g}], got {r}")
        if self.representation == "gaussians" and self.shading != "albedo":
            raise ValueError(
                f"shading {self.shading!r}: the gaussians representation is albedo only"
            )
        if not 0 <= self.mesh_min_component < 1:
            raise ValueError(f"mesh_min_component must be in [0, 1), got {self.mesh_min_component}")
        if self.mesh_faces < 0:
            raise ValueError(f"mesh_faces must be >= 0, got {self.mesh_faces}")
        if self.texture_size < 16:
            raise ValueError(f"texture_size must be >= 16, got {self.texture_size}")
