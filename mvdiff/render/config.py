"""The typed config of a render run (``mvdiff render``, ``data_prep/render.py``).

Every number of the MVDream render recipe (docs/design.md §6) is a field here; YAML files under
``data_prep/configs/`` and ``--set key=value`` override them (see :mod:`mvdiff.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mvdiff.errors import UserError

ENGINES = ("CYCLES", "BLENDER_EEVEE", "BLENDER_WORKBENCH")
RIGS = ("mvdream", "fixed", "orbit")
BACKENDS = ("local", "ray")
# Fields that `mvdiff render` sets with a flag of the same name (``--shard-max-samples``); the
# others are set with ``--set field=value`` or a config file, and errors name them that way.
FLAG_FIELDS = (
    "output", "views", "resolution", "samples", "workers", "backend", "timeout", "captions",
    "rig", "retries", "seed", "engine", "limit", "recycle_every", "shard_max_samples",
    "objaverse_uids", "objaverse_lvis", "objaverse_mirror", "objaverse_cache", "ray_address",
    "work_dir", "depth", "normal",
)  # fmt: skip


def field_flag(name: str) -> str:
    """How a user sets field ``name``: ``--flag`` when it has one, else ``--set name=...``."""
    return f"--{name.replace('_', '-')}" if name in FLAG_FIELDS else f"--set {name}=..."


@dataclass
class RenderConfig:
    # --- what and where ---------------------------------------------------------------
    inputs: list[str] = field(default_factory=list)  # files, folders, objaverse:UID
    output: str = ""  # folder or fsspec URL for shards + manifest.jsonl
    captions: str = ""  # CSV "uid,caption" (Cap3D layout); else name + tags
    limit: int = 0  # render at most this many objects (0 = all)
    # --- Objaverse (through the `objaverse` package, any mirror of its layout) ---------
    objaverse_uids: list[str] = field(default_factory=list)  # uids, or a file of uids
    objaverse_lvis: list[str] = field(default_factory=list)  # LVIS categories
    objaverse_mirror: str = ""  # base URL replacing the Hugging Face host ("" = default)
    objaverse_cache: str = ""  # download cache ("" = ~/.objaverse)
    # --- the camera rig ---------------------------------------------------------------
    rig: str = "mvdream"  # mvdream | fixed | orbit
    views: int = 32
    elevation_range: tuple[float, float] = (0.0, 30.0)  # mvdream: one per object
    fov_range: tuple[float, float] = (15.0, 60.0)  # mvdream: one per object
    distance_factor_range: tuple[float, float] = (0.9, 1.1)  # mvdream: times the framing distance
    elevations: list[float] = field(default_factory=lambda: [15.0])  # fixed/orbit (one or V)
    azimuths: list[float] = field(default_factory=list)  # fixed (V values)
    fov: float = 40.0  # fixed/orbit
    distance_factor: float = 1.0  # fixed/orbit
    seed: int = 0  # rig randomness is a function of (seed, uid): resumable, reproducible
    # --- the scene and the renderer ---------------------------------------------------
    resolution: int = 256
    engine: str = "CYCLES"
    samples: int = 32
    denoise: bool = True  # OpenImageDenoise
    denoise_quality: str = (
        "FAST"  # HIGH | BALANCED | FAST (FAST ~ BALANCED at 256^2, half the cost)
    )
    denoise_passes: str = "RGB_ALBEDO"  # RGB | RGB_ALBEDO | RGB_ALBEDO_NORMAL (denoiser guides)
    denoise_prefilter: str = "FAST"  # NONE | FAST | ACCURATE (of the albedo/normal guides)
    # Cycles adaptive sampling: stop a pixel once its noise is below `noise_threshold`,
    # checked from `adaptive_min_samples` on. Cycles' automatic minimum (0 here) is
    # ceil(16 / threshold^0.3) = 40 at 0.05, so at 32 samples it would never trigger; from 8
    # on, flat and converged pixels stop early and the denoiser cleans the rest.
    noise_threshold: float = 0.05
    adaptive_min_samples: int = 8  # 0 = Cycles' automatic minimum
    max_bounces: int = 4
    tuned: bool = True  # our fast Cycles settings; false = Blender's stock ones (baseline)
    world_strength: float = 1.0  # uniform white environment = even lighting
    sun_strength: float = 0.0  # optional key light from above-front (W/m^2)
    depth: bool = False  # KEY.depth.VVV.png (16-bit, millimetres of the normalised scene)
    normal: bool = False  # KEY.normal.VVV.png (world-space, (n+1)/2)
    threads_per_worker: int = 1
    # --- jobs -------------------------------------------------------------------------
    backend: str = "local"  # local | ray
    ray_address: str = ""  # "" = $RAY_ADDRESS, else a local Ray; "auto", HOST:PORT, ray://...
    workers: int = 0  # 0 = one per CPU core
    timeout: float = 300.0  # seconds per object, then the worker's process group is killed
    startup_timeout: float = 180.0  # seconds for a worker to import bpy and set up
    retries: int = 1  # extra attempts after a crash/timeout/invalid output
    recycle_every: int = 50  # restart a worker after this many objects (bounds memory)
    # --- shards -----------------------------------------------------------------------
    shard_prefix: str = "mv"
    shard_max_samples: int = 256
    shard_max_bytes: int = 1 << 30
    work_dir: str = ""  # local staging for fsspec URLs ("" = ~/.cache/mvdiff/render/<hash>)

    def validate(self) -> RenderConfig:
        """Raise :class:`UserError` naming the bad field; return self."""

        def bad(name, why):
            raise UserError(f"{field_flag(name)}: {why}")

        if not self.output:
            bad("output", "is required")
        if self.rig not in RIGS:
            bad("rig", f"{self.rig!r} is not one of {list(RIGS)}")
        if self.backend not in BACKENDS:
            bad("backend", f"{self.backend!r} is not one of {list(BACKENDS)}")
        self.engine = self.engine.upper()
        if self.engine in ("EEVEE", "WORKBENCH"):
            self.engine = "BLENDER_" + self.engine
        if self.engine not in ENGINES:
            bad("engine", f"{self.engine!r} is not one of {list(ENGINES)}")
        if self.views < 1:
            bad("views", f"must be >= 1, got {self.views}")
        if not 8 <= self.resolution <= 8192:
            bad("resolution", f"must be in [8, 8192], got {self.resolution}")
        if self.adaptive_min_samples < 0:
            bad("adaptive_min_samples", f"must be >= 0, got {self.adaptive_min_samples}")
        if self.samples < 1:
            bad("samples", f"must be >= 1, got {self.samples}")
        if self.denoise_quality not in ("HIGH", "BALANCED", "FAST"):
            bad("denoise_quality", f"{self.denoise_quality!r} is not one of HIGH, BALANCED, FAST")
        if self.denoise_passes not in ("RGB", "RGB_ALBEDO", "RGB_ALBEDO_NORMAL"):
            bad("denoise_passes", f"{self.denoise_passes!r} is not one of RGB, RGB_ALBEDO, "
                "RGB_ALBEDO_NORMAL")  # fmt: skip
        if self.denoise_prefilter not in ("NONE", "FAST", "ACCURATE"):
            bad(
                "denoise_prefilter",
                f"{self.denoise_prefilter!r} is not one of NONE, FAST, ACCURATE",
            )
        if self.timeout <= 0:
            bad("timeout", f"must be > 0, got {self.timeout}")
        if self.retries < 0:
            bad("retries", f"must be >= 0, got {self.retries}")
        if self.workers < 0:
            bad("workers", f"must be >= 0, got {self.workers}")
        if self.recycle_every < 1:
            bad("recycle_every", f"must be >= 1, got {self.recycle_every}")
        if self.shard_max_samples < 1:
            bad("shard_max_samples", f"must be >= 1, got {self.shard_max_samples}")
        if "." in self.shard_prefix or "/" in self.shard_prefix:
            bad("shard_prefix", f"{self.shard_prefix!r} must not contain '.' or '/'")
        for name in ("elevation_range", "fov_range", "distance_factor_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                bad(name, f"low {lo} > high {hi}")
        if not (0 < self.fov_range[0] and self.fov_range[1] < 180 and 0 < self.fov < 180):
            bad("fov_range", f"fields of view must be inside (0, 180), got {list(self.fov_range)}")
        if self.rig == "fixed":
            if len(self.azimuths) != self.views:
                example = ",".join(f"{i * 360 / self.views:g}" for i in range(self.views))
                raise UserError(
                    f"--set azimuths=[...]: the fixed rig needs one azimuth in degrees per view "
                    f"(--views {self.views}), e.g. --set azimuths=[{example}], got "
                    f"{len(self.azimuths)}"
                )
        if self.rig in ("fixed", "orbit") and len(self.elevations) not in (1, self.views):
            bad(
                "elevations",
                f"give 1 or {self.views} elevations in degrees (e.g. --set elevations=[15]), "
                f"got {len(self.elevations)}",
            )
        return self
