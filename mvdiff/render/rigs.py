"""Camera rigs: where the cameras of one object go (docs/design.md §4 convention, §6 recipe).

A rig is a dict of per-view lists ``elevation_deg``, ``azimuth_deg``, ``fov_deg``,
``distance`` and ``c2w`` (float64 ``[V, 4, 4]``, OpenGL camera frame, z-up world). The
worker places Blender's camera with these matrices and reports back the ``matrix_world``
Blender actually used; that read-back is what goes into the shard.
"""

from __future__ import annotations

import hashlib

import numpy as np

from mvdiff.cameras import framing_distance, orbit_c2w, sample_mvdream_render_rig


def object_rng(seed: int, uid: str) -> np.random.Generator:
    """A generator that depends only on (seed, uid): a resumed run draws the same cameras."""
    digest = int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def cameras_from_sample(folder) -> dict:
    """The cameras of an ``mvdiff sample`` output folder (its ``cameras.json``) as fixed-rig
    settings: ``elevations``/``azimuths`` (degrees, per view, from the ``c2w`` camera centres)
    and ``fov`` (None when the file has none: the model's cameras have no field of view)."""
    import json
    from pathlib import Path

    from mvdiff.errors import UserError
    from mvdiff.render.shards import spherical_from_c2w

    path = Path(folder) / "cameras.json"
    where = f"--cameras-from {folder}"
    if not path.is_file():
        raise UserError(f"{where}: no cameras.json (not an `mvdiff sample` output folder)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        views = record["views"]
        c2w = np.asarray([v["c2w"] for v in views], dtype=np.float64).reshape(-1, 4, 4)
        fov = record.get("fov_deg")
        fov = None if fov is None else float(fov)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{where}: not a readable cameras.json ({e})") from None
    if len(c2w) == 0 or not np.isfinite(c2w).all():
        raise UserError(f"{where}: cameras.json has no finite cameras")
    elevations, azimuths, distance = spherical_from_c2w(c2w)  # ([V], [V], [V])
    if min(distance) < 1e-6:
        raise UserError(f"{where}: a camera of cameras.json is at the origin")
    return {"elevations": elevations, "azimuths": azimuths, "fov": fov}


def fixed_rig(elevations, azimuths, fov_deg: float = 40.0, distance_factor: float = 1.0) -> dict:
    """Cameras at the given elevations/azimuths (degrees), all looking at the origin."""
    azimuths = np.asarray(azimuths, dtype=np.float64)
    elevations = np.broadcast_to(np.asarray(elevations, dtype=np.float64), azimuths.shape)
    distance = framing_distance(fov_deg) * distance_factor
    n = len(azimuths)
    return {
        "elevation_deg": elevations.tolist(),
        "azimuth_deg": azimuths.tolist(),
        "fov_deg": [float(fov_deg)] * n,
        "distance": [distance] * n,
        "c2w": orbit_c2w(elevations, azimuths, distance),
    }


def orbit_rig(num_views: int, elevation=15.0, fov_deg=40.0, distance_factor=1.0) -> dict:
    """A turntable: ``num_views`` azimuths evenly spaced from 0 (front, -y), counter-clockwise."""
    azimuths = np.arange(num_views) * (360.0 / num_views)
    return fixed_rig(elevation, azimuths, fov_deg, distance_factor)


def make_rig(cfg, uid: str) -> dict:
    """The rig of object ``uid`` under config ``cfg`` (a :class:`RenderConfig`)."""
    if cfg.rig == "mvdream":
        return sample_mvdream_render_rig(
            object_rng(cfg.seed, uid),
            num_views=cfg.views,
            elevation_range=tuple(cfg.elevation_range),
            fov_range=tuple(cfg.fov_range),
            distance_factor_range=tuple(cfg.distance_factor_range),
        )
    elevations = cfg.elevations if len(cfg.elevations) > 1 else cfg.elevations[0]
    if cfg.rig == "fixed":
        return fixed_rig(elevations, cfg.azimuths, cfg.fov, cfg.distance_factor)
    if cfg.rig == "orbit":
        return orbit_rig(cfg.views, elevations, cfg.fov, cfg.distance_factor)
    raise ValueError(f"unknown rig {cfg.rig!r}")
