"""Camera math for mvdiff — one convention everywhere.

Convention (docs/design.md §4)
----------------------
* World frame: Blender's, right-handed, **z up**. Assets are normalised so that their
  bounding box is centred at the origin and its longest side is 1.
* Camera frame: OpenGL / Blender — the camera looks down its **-z** axis, **+y** is up,
  **+x** is right.
* Stored matrices are **camera-to-world** (``c2w``; Blender's ``matrix_world``).
  OpenCV's c2w is ``c2w_gl @ diag(1, -1, -1, 1)``.
* Intrinsics: square images with equal vertical and horizontal field of view,
  ``f = (W / 2) / tan(fov / 2)``, principal point at the image centre.
* Spherical parameters: ``elevation`` above the xy-plane; ``azimuth`` 0 puts the camera on
  the **-y** axis (Blender's front view) and increases counter-clockwise seen from +z.
  This equals the official MVDream ``get_camera(..., blender_coord=True)``;
  threestudio's azimuth is MVDream's minus 90 degrees.
* Model camera vector (16 numbers): the c2w matrix with its translation scaled to unit
  length, flattened row-major. Field of view and distance are not part of it.

Everything here is float64 numpy internally (exact enough to match the official code to
~1e-7) with torch front-ends where the model needs them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "GL_TO_CV",
    "camera_vectors",
    "get_camera",
    "gl_to_cv",
    "cv_to_gl",
    "intrinsics_from_fov",
    "look_at",
    "orbit_c2w",
    "orbit_positions",
    "sample_mvdream_render_rig",
    "sample_sds_group",
    "select_training_views",
]

#: Right-multiply an OpenGL c2w by this to get the OpenCV c2w (and vice versa).
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def orbit_positions(elevation_deg, azimuth_deg, distance=1.0) -> np.ndarray:
    """Camera centres on a sphere around the origin, ``[..., 3]`` (z up, azimuth 0 on -y)."""
    el = np.radians(np.asarray(elevation_deg, dtype=np.float64))
    az = np.radians(np.asarray(azimuth_deg, dtype=np.float64))
    d = np.asarray(distance, dtype=np.float64)
    x = np.cos(el) * np.sin(az)
    y = -np.cos(el) * np.cos(az)
    z = np.sin(el)
    return np.stack(np.broadcast_arrays(x * d, y * d, z * d), axis=-1)


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenGL-style c2w matrices ``[..., 4, 4]`` for cameras at ``eye`` looking at ``target``.

    The camera's -z axis points at the target and +y is as close to ``up`` as possible.
    Undefined when looking straight along ``up`` (elevation ±90°).
    """
    eye = np.asarray(eye, dtype=np.float64)
    target = np.broadcast_to(np.asarray(target, dtype=np.float64), eye.shape)
    up = np.broadcast_to(np.asarray(up, dtype=np.float64), eye.shape)
    forward = target - eye
    forward = forward / np.linalg.norm(forward, axis=-1, keepdims=True)
    right = np.cross(forward, up)
    right = right / np.linalg.norm(right, axis=-1, keepdims=True)
    true_up = np.cross(right, forward)
    c2w = np.zeros(eye.shape[:-1] + (4, 4))
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = true_up
    c2w[..., :3, 2] = -forward
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1.0
    return c2w


def orbit_c2w(elevation_deg, azimuth_deg, distance=1.0) -> np.ndarray:
    """c2w matrices ``[..., 4, 4]`` (float64) of cameras orbiting the origin, looking at it."""
    return look_at(orbit_positions(elevation_deg, azimuth_deg, distance))


def gl_to_cv(c2w):
    """OpenGL/Blender c2w -> OpenCV c2w (camera looks down +z, +y down). Works on [..., 4, 4]."""
    if isinstance(c2w, torch.Tensor):
        return c2w @ torch.as_tensor(GL_TO_CV, dtype=c2w.dtype, device=c2w.device)
    return np.asarray(c2w) @ GL_TO_CV


# The flip is its own inverse.
cv_to_gl = gl_to_cv


def intrinsics_from_fov(fov_deg: float, width: int, height: int | None = None) -> np.ndarray:
    """Pinhole ``K`` (3x3, pixels) for a square-pixel camera whose horizontal = vertical fov."""
    height = width if height is None else height
    f = (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def camera_vectors(c2w) -> torch.Tensor:
    """Model camera vectors ``[N, 16]`` float32: translation scaled to unit length, row-major."""
    m = torch.as_tensor(np.asarray(c2w) if not isinstance(c2w, torch.Tensor) else c2w)
    m = m.to(torch.float64).reshape(-1, 4, 4).clone()  # (..., 4, 4) -> (N, 4, 4)
    t = m[:, :3, 3]
    m[:, :3, 3] = t / (t.norm(dim=1, keepdim=True) + 1e-8)
    return m.reshape(-1, 16).float()  # (N, 4, 4) -> (N, 16)


def get_camera(
    num_views: int,
    elevation: float = 15.0,
    azimuth_start: float = 0.0,
    azimuth_span: float = 360.0,
) -> torch.Tensor:
    """The official MVDream ``get_camera``: ``[num_views, 16]`` float32 on the unit sphere.

    Views are ``azimuth_span / num_views`` degrees apart starting at ``azimuth_start``, all
    at ``elevation``. Equal to the official function with ``blender_coord=True``.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    azimuths = azimuth_start + np.arange(num_views) * (azimuth_span / num_views)
    c2w = orbit_c2w(np.full(num_views, float(elevation)), azimuths, 1.0)
    return torch.from_numpy(c2w.reshape(num_views, 16)).float()  # (V, 4, 4) -> (V, 16)


def sample_mvdream_render_rig(
    rng: np.random.Generator,
    num_views: int = 32,
    elevation_range=(0.0, 30.0),
    fov_range=(15.0, 60.0),
    distance_factor_range=(0.9, 1.1),
) -> dict:
    """The MVDream rendering rig (docs/design.md §6) for one object.

    ``num_views`` azimuths evenly spaced with a random offset, one elevation and one field of
    view per object, and a distance at which a unit-size object fills the frame (times a
    random factor). Returns lists of floats: ``elevation_deg``, ``azimuth_deg``, ``fov_deg``,
    ``distance`` (one per view) and ``c2w`` ``[V, 4, 4]`` float64.
    """
    offset = rng.uniform(0.0, 360.0 / num_views)
    azimuths = (offset + np.arange(num_views) * (360.0 / num_views)) % 360.0
    elevation = rng.uniform(*elevation_range)
    fov = rng.uniform(*fov_range)
    distance = framing_distance(fov) * rng.uniform(*distance_factor_range)
    elevations = np.full(num_views, elevation)
    return {
        "elevation_deg": elevations.tolist(),
        "azimuth_deg": azimuths.tolist(),
        "fov_deg": [fov] * num_views,
        "distance": [distance] * num_views,
        "c2w": orbit_c2w(elevations, azimuths, distance),
    }


def framing_distance(fov_deg: float) -> float:
    """The camera distance at which the unit box (the renderer's normalised object, centred at
    the origin) fills a ``fov_deg`` frame: its bounding sphere of radius ``sqrt(3)/2`` just
    touches the frame at ``(sqrt(3)/2) / sin(fov/2)`` (docs/design.md §4)."""
    return (math.sqrt(3) / 2) / math.sin(math.radians(fov_deg) / 2)


def select_training_views(
    num_rendered: int, num_views: int = 4, generator: torch.Generator | None = None
) -> list[int]:
    """Indices of ``num_views`` views evenly spread over a ring of ``num_rendered``.

    With the MVDream rig (azimuths evenly spaced) and 4 of 32, the views are 90° apart with a
    random start index.
    """
    if num_rendered % num_views:
        raise ValueError(f"{num_views} views cannot be evenly spread over {num_rendered}")
    step = num_rendered // num_views
    start = int(torch.randint(num_rendered, (1,), generator=generator))
    return [(start + i * step) % num_rendered for i in range(num_views)]


def sample_sds_group(
    generator: torch.Generator | None = None,
    num_views: int = 4,
    elevation_range=(0.0, 30.0),
    fov_range=(15.0, 60.0),
    distance_factor_range=(0.9, 1.1),
    relative_distance_range=None,
) -> dict:
    """One SDS camera group (docs/design.md §6): ``num_views`` cameras 360/V degrees apart with a shared
    random azimuth offset, one elevation, one fov and a framing distance.

    The distance is ``distance_factor_range`` times the framing distance
    ``(sqrt(3)/2) / sin(fov/2)`` (MVDream's ranges), or, with ``relative_distance_range``,
    threestudio's ``relative_radius`` distance ``r / tan(fov/2)`` (``r`` = half the frame's
    height at the origin, in unit-box units; ImageDream's configs).

    Returns torch tensors: ``c2w`` ``[V, 4, 4]`` float32, ``camera`` ``[V, 16]`` (model
    vectors), ``fov_deg`` ``[V]``, ``elevation_deg`` ``[V]``, ``azimuth_deg`` ``[V]``.
    """

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    offset = uniform(0.0, 360.0)
    azimuths = (offset + np.arange(num_views) * (360.0 / num_views)) % 360.0
    elevation = uniform(*elevation_range)
    fov = uniform(*fov_range)
    if relative_distance_range is not None:
        distance = uniform(*relative_distance_range) / math.tan(math.radians(fov) / 2)
    else:
        distance = framing_distance(fov) * uniform(*distance_factor_range)
    c2w = orbit_c2w(np.full(num_views, elevation), azimuths, distance)
    return {
        "c2w": torch.from_numpy(c2w).float(),
        "camera": camera_vectors(c2w),
        "fov_deg": torch.full((num_views,), fov),
        "elevation_deg": torch.full((num_views,), elevation),
        "azimuth_deg": torch.from_numpy(azimuths).float(),
    }
